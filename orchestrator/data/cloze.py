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

Text clean-up as lm-eval's: HellaSwag's context and endings go through its ``preprocess`` (`` [title]`` becomes
``". "``, any other ``[...]`` is removed, double spaces become one); PIQA's solutions keep their own leading and
trailing spaces (lm-eval scores the dataset's strings as they are; the LLM-Adapters loader strips them, so they
are read back from the instruction); a WinoGrande sentence without ``_`` is refused (lm-eval cannot build its
contexts either).

Tokenisation of a (context, continuation) pair follows lm-eval's ``_encode_pair``: trailing spaces of the
context move to the continuation, ``context + continuation`` is encoded as one string, and the continuation ids
are that encoding after the context's own ids. Encoding the continuation alone would differ for SentencePiece
tokenizers (which prefix a space to every encoded string) and wherever BPE merges across the boundary. Special
tokens a tokenizer appends after the text (an EOS) are dropped from both encodings, and the joint encoding must
start with the context's ids; where it does not (a merge across the boundary) the pair is refused, since the
continuation's first token could not be told apart.

Length: a pair longer than the row allows keeps its continuation whole and as much context as fits, cut from the
left with BOS kept (:func:`fit_cloze_pair`, through ``orchestrator.data.tokenize.fit_context``); training and
scoring cut with the same function and length, so the trained row is the scored row.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.data.schema import DataError, Example
from orchestrator.data.tokenize import fit_context, fit_pair

FORMULATIONS = ("cloze", "label")
SMALL_MODEL_PARAMS = 1_000_000_000
"""Below this many parameters a model learns only the label prior in the label formulation (see the docstring)."""


@dataclass(frozen=True)
class ClozeItem:
    """An item's cloze strings, one entry per option.

    contexts:      text before the scored part (the same for every option except WinoGrande's).
    continuations: the scored text, starting with the target delimiter " ".
    choices:       lm-eval's ``doc_to_choice`` strings; ``acc_norm`` divides an option's log-likelihood by
                   ``len(choice)`` characters (lm-eval's ``acc_norm``). OLMES' ``acc_per_char`` divides by
                   ``len(" " + choice)``, one character more, which can change a pick between options of
                   different lengths (``docs/cloze.md``, Metrics).
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess``: strip; ``" [title]"`` -> ``". "``; drop every ``[...]``; two spaces -> one.

    The WikiHow markup is gone from our file, but 18 items keep bracketed text such as ``[www.kiddio.org]`` that
    lm-eval removes; the same function applies to the context and to every ending.
    """
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


_PIQA_SOLUTION = re.compile(r"Solution(\d+): (.*?)\n\n(?=Solution\d+: |Answer format:)", re.S)


def piqa_solutions(ex: Example) -> tuple[str, ...]:
    """PIQA's solutions with their own spaces, read back from the LLM-Adapters instruction
    (``Solution1: {sol1}\n\nSolution2: {sol2}\n\nAnswer format: ...``); lm-eval scores ``sol1``/``sol2`` as the
    dataset has them (118 test items end in a space). Falls back to the parsed options where the instruction has
    another layout."""
    found = _PIQA_SOLUTION.findall(ex.prompt)
    raw = tuple(text for _, text in found)
    if [int(k) for k, _ in found] == list(range(1, len(ex.choices) + 1)) and \
            tuple(r.strip() for r in raw) == tuple(c.strip() for c in ex.choices):
        return raw
    return tuple(ex.choices)


def cloze_item(task, ex: Example) -> ClozeItem:
    """The cloze strings of a multiple-choice item of ``task`` (see the module docstring)."""
    if not ex.choices:
        raise DataError(f"task {task.name!r}: an item without options has no cloze formulation")
    words = dict(task.cloze_words)
    choices = piqa_solutions(ex) if task.name == "piqa" else ex.choices
    options = tuple(words.get(c, c) for c in choices)
    q = (ex.question or ex.prompt).strip()
    if task.cloze == "blank":
        if "_" not in q:
            raise DataError(f"task {task.name!r}: the sentence {q[:80]!r} has no blank '_' to fill with an option "
                            "(lm-eval's WinoGrande contexts need one). Fix: drop the item or repair its sentence")
        cut = q.index("_")
        filled = tuple(q[:cut] + option for option in options)  # lm-eval's winogrande doc_to_choice
        rest = " " + q[cut + 1:].strip()
        return ClozeItem(filled, (rest,) * len(options), filled)
    if task.cloze == "continuation":
        q, options = hellaswag_clean(q), tuple(hellaswag_clean(o) for o in options)
    context = {"continuation": q, "answer": f"{q}\nAnswer:"}.get(task.cloze, f"Question: {q}\nAnswer:")
    return ClozeItem((context,) * len(options), tuple(f" {o}" for o in options), options)


def _encode(tokenizer, text: str) -> list[int]:
    """``tokenizer(text)`` ids without the special tokens it appends after the text (an EOS), leading ones kept."""
    ids = list(tokenizer(text)["input_ids"])
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    for lead in range(len(ids) - len(plain) + 1):
        if ids[lead:lead + len(plain)] == plain:
            return ids[:lead + len(plain)]
    return ids


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` as lm-eval encodes a request (the tokenizer's own BOS, if any, leads).

    Both encodings drop special tokens appended after the text; a joint encoding that does not start with the
    context's ids is refused (the continuation would be shifted by the difference)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    if whole[:len(ctx)] != ctx:
        raise DataError(f"the tokenizer encodes context + continuation ({context[-40:]!r} + {continuation[:40]!r}) "
                        "with other leading tokens than the context alone (a merge across the boundary), so the "
                        "continuation's tokens cannot be split off. Fix: use a tokenizer that keeps the boundary "
                        "(the context ends before a space), or the label formulation")
    cont = whole[len(ctx):]
    if not cont:
        raise DataError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
    return ctx, cont


def cloze_requests(task, ex: Example, tokenizer) -> list[tuple[list[int], list[int]]]:
    """``[(context_ids, continuation_ids)]`` per option: the rows the scorer scores."""
    item = cloze_item(task, ex)
    return [encode_pair(tokenizer, c, k) for c, k in zip(item.contexts, item.continuations)]


def eos_ids(tokenizer) -> list[int]:
    """What training appends after the gold continuation: ``[eos]``, or nothing for a tokenizer without one."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def fit_cloze_pair(tokenizer, context: list[int], continuation: list[int], max_length: int
                   ) -> tuple[list[int], list[int]] | None:
    """``(context, continuation)`` of the row an item is trained on, at most ``max_length`` tokens with the eos
    training appends: the continuation whole, the context cut by ``fit_context`` (from the left, BOS kept); None
    when the continuation and eos leave no room for one context token. Training and scoring both cut here."""
    cut = fit_context(context, len(continuation) + len(eos_ids(tokenizer)), max_length, tokenizer.bos_token_id)
    return None if cut is None else (cut, list(continuation))


def encode_cloze_example(tokenizer, task, ex: Example, *, max_length: int) -> dict | None:
    """The training example of an item in cloze: ``input_ids = context + gold continuation + <eos>`` with the loss
    on the continuation and eos, token for token the scorer's row of the gold option (None when it cannot fit):
    ``fit_pair`` cuts the context with the reserve :func:`fit_cloze_pair` uses."""
    ctx, cont = cloze_requests(task, ex, tokenizer)[ex.answer_index]
    return fit_pair(tokenizer, ctx, cont + eos_ids(tokenizer), max_length)
