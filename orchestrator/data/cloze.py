"""The cloze formulation: per task, the context and each option's own continuation, and the training example
that teaches exactly the row the scorer scores.

Formulations (``data.formulation`` of a search space, ``--formulation`` of ``python -m orchestrator.evaluate``):

- ``cloze``: the context holds no option list; each option is scored as its own continuation,
  ``LL(" {option}" | context)``, and the model is trained on ``context -> " {gold option}" <eos>``. The strings
  are those of lm-evaluation-harness and OLMES (``docs/cloze.md`` gives them per task, with their source files
  and our deviations)::

      qa            "Question: {q}\\nAnswer:"  + " {option}"        ARC-E, ARC-C, OBQA, PIQA, SIQA, BoolQ, MMLU
      continuation  "{q}"                     + " {option}"        HellaSwag
      blank         "{q before _}{option}"    + " {q after _}"     WinoGrande (partial scoring)
      answer        "{q}\\nAnswer:"            + " {option}"        PubMedQA (q holds the context)

- ``label``: the LLM-Adapters formulation: the templated instruction lists the options and the answer is a label
  word (``"the correct answer is answer3"``). Models below roughly 1B parameters learn only which label is
  frequent in it (Robinson & Wingate, ICLR 2023; OLMES, arXiv 2406.08446).

Tokenisation of a (context, continuation) pair follows lm-eval's ``_encode_pair``: trailing spaces of the
context move to the continuation, ``context + continuation`` is encoded as one string, and the continuation ids
are that encoding after the context's own ids. Encoding the continuation alone would differ for SentencePiece
tokenizers (which prefix a space to every encoded string) and wherever BPE merges across the boundary.
"""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.data.schema import DataError, Example
from orchestrator.data.tokenize import fit_pair

FORMULATIONS = ("cloze", "label")
SMALL_MODEL_PARAMS = 1_000_000_000
"""Below this many parameters a model learns only the label prior in the label formulation (see the docstring)."""


@dataclass(frozen=True)
class ClozeItem:
    """An item's cloze strings, one entry per option.

    contexts:      text before the scored part (the same for every option except WinoGrande's).
    continuations: the scored text, starting with the target delimiter " ".
    choices:       lm-eval's ``doc_to_choice`` strings; ``acc_norm`` divides an option's log-likelihood by
                   ``len(choice)`` characters (lm-eval's ``acc_norm``; OLMES' ``acc_per_char``).
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]


def cloze_item(task, ex: Example) -> ClozeItem:
    """The cloze strings of a multiple-choice item of ``task`` (see the module docstring)."""
    if not ex.choices:
        raise DataError(f"task {task.name!r}: an item without options has no cloze formulation")
    words = dict(task.cloze_words)
    options = tuple(words.get(c, c) for c in ex.choices)
    q = (ex.question or ex.prompt).strip()
    if task.cloze == "blank" and "_" in q:
        cut = q.index("_")
        filled = tuple(q[:cut] + option for option in options)  # lm-eval's winogrande doc_to_choice
        rest = " " + q[cut + 1:].strip()
        return ClozeItem(filled, (rest,) * len(options), filled)
    context = {"continuation": q, "answer": f"{q}\nAnswer:"}.get(task.cloze, f"Question: {q}\nAnswer:")
    return ClozeItem((context,) * len(options), tuple(f" {o}" for o in options), options)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` as lm-eval encodes a request (the tokenizer's own BOS, if any, leads)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    cont = whole[len(ctx):]
    if not cont:
        raise DataError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
    return ctx, cont


def cloze_requests(task, ex: Example, tokenizer) -> list[tuple[list[int], list[int]]]:
    """``[(context_ids, continuation_ids)]`` per option: the rows the scorer scores."""
    item = cloze_item(task, ex)
    return [encode_pair(tokenizer, c, k) for c, k in zip(item.contexts, item.continuations)]


def encode_cloze_example(tokenizer, task, ex: Example, *, max_length: int) -> dict | None:
    """The training example of an item in cloze: ``input_ids = context + gold continuation + <eos>`` with the loss
    on the continuation and eos, token for token the scorer's row of the gold option (None when it cannot fit)."""
    ctx, cont = cloze_requests(task, ex, tokenizer)[ex.answer_index]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return fit_pair(tokenizer, ctx, cont + eos, max_length)
