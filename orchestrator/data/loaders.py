"""File readers for the benchmark formats, all producing :class:`Example` lists.

Formats (see ``../shared/data/README.md``):

- LLM-Adapters JSON (``[{"instruction", "input", "output", "answer"}]``). For the commonsense tasks the
  instruction lists the options (``Solution1: ...``, ``Answer1: ...``, ``Ending1: ...``, ``Option1: ...``) and
  ends with ``Answer format: answer1/answer2/...``; ``answer`` is the gold label word and ``output`` is
  ``"the correct answer is <label>"``. For the math test sets only ``answer`` is gold (``output`` is a
  model-written rationale), and AQuA's answer is a letter A-E.
- GSM8K jsonl: ``{"question", "answer"}``, the final number after ``#### `` on the last line.
- PubMedQA: ``ori_pqal.json`` (PMID -> QUESTION, CONTEXTS, final_decision) + ``test_ground_truth.json``.
- MMLU CSV: ``question,choice0..choice3,answer`` with a 0-based answer index.

Every item is turned into the same LLM-Adapters-style instruction, so one template and one scorer serve all.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from orchestrator.data.schema import DataError, Example

LABEL_PREFIX = "the correct answer is"  # every choice target is f"{LABEL_PREFIX} {label}"
MATH_PREFIX = "The answer is"  # every free-form target ends with f"{MATH_PREFIX} {number}."

_FORMAT_RE = re.compile(r"Answer format:\s*(\S+)\s*$")
_HEADER_RE = re.compile(r"^Please (?:choose|answer)[^:]*:\s*")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _read_json(path: Path):
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc


# ---------------------------------------------------------------------------------------------- choice items
def parse_choice_instruction(instruction: str) -> tuple[str, tuple[str, ...] | None, tuple[str, ...]]:
    """Split an LLM-Adapters multiple-choice instruction into ``(question, option texts, label words)``.

    The label words come from the trailing ``Answer format: a/b/...``; the option texts are located by their
    markers (``Answer1:`` ... ``AnswerK:`` for labels ``answer1..answerK``), searched backwards from the format
    line so that a question mentioning a marker cannot shift them. BoolQ (labels ``true/false``) has no option
    list: the options are the label words themselves, returned as ``None``.
    """
    m = _FORMAT_RE.search(instruction)
    if m is None:
        raise ValueError("no 'Answer format:' line")
    labels = tuple(m.group(1).split("/"))
    body = instruction[: m.start()]
    head = _HEADER_RE.match(body)
    start = head.end() if head else 0
    word = re.match(r"[a-z]+", labels[0])
    if word is None or not all(re.fullmatch(rf"{word.group(0)}\d+", lab) for lab in labels):
        return body[start:].strip(), None, labels  # plain label words (true/false)
    marker = word.group(0).capitalize()
    end, options = len(body), []
    for k in range(len(labels), 0, -1):
        pos = body.rfind(f"{marker}{k}:", start, end)
        if pos < 0:
            raise ValueError(f"option marker '{marker}{k}:' not found")
        options.append(body[pos + len(f"{marker}{k}:") : end].strip())
        end = pos
    return body[start:end].strip(), tuple(reversed(options)), labels


def choice_example(item: dict, where: str) -> Example:
    """One LLM-Adapters commonsense item -> :class:`Example` (``where`` names the file and index in errors)."""
    try:
        question, options, labels = parse_choice_instruction(item["instruction"])
        gold = str(item["answer"]).strip()
        answer_index = labels.index(gold)
    except (KeyError, ValueError) as exc:
        raise DataError(f"{where}: not an LLM-Adapters multiple-choice item ({exc})") from exc
    return Example(
        prompt=item["instruction"],
        target=f"{LABEL_PREFIX} {gold}",
        choices=options if options is not None else labels,
        answer_index=answer_index,
        gold=gold,
        labels=labels,
        question=question,
    )


def mc_instruction(question: str, options: list[str] | tuple[str, ...], *, header: str = "answer to the question",
                   word: str = "answer", option_sep: str = " ", tail_sep: str = "\n\n") -> str:
    """Build an instruction in the LLM-Adapters layout (used for MMLU and for Hub rows)."""
    marker = word.capitalize()
    listed = option_sep.join(f"{marker}{k}: {text}" for k, text in enumerate(options, 1))
    fmt = "/".join(f"{word}{k}" for k in range(1, len(options) + 1))
    return f"Please choose the correct {header}: {question}\n\n{listed}{tail_sep}Answer format: {fmt}"


def mc_item(question: str, options, answer_index: int, **layout) -> dict:
    """An LLM-Adapters-format dict for a multiple-choice question (gold = ``answer{k}``)."""
    word = layout.get("word", "answer")
    label = f"{word}{answer_index + 1}"
    return {"instruction": mc_instruction(question, list(options), **layout), "input": "",
            "output": f"{LABEL_PREFIX} {label}", "answer": label}


def read_llm_adapters_choice(path: Path) -> list[Example]:
    """A commonsense ``train.json``/``test.json`` file."""
    return [choice_example(item, f"{path}[{i}]") for i, item in enumerate(_read_json(path))]


# ---------------------------------------------------------------------------------------------- math items
def extract_last_number(text: str) -> float | None:
    """The last number in ``text`` (commas as thousands separators allowed), or ``None``."""
    found = _NUMBER_RE.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _aqua_options(instruction: str) -> tuple[str, tuple[str, ...] | None]:
    head, sep, tail = instruction.partition("Answer Choices:")
    if not sep:
        return instruction.strip(), None
    parts = re.split(r"\(([A-E])\)\s*", tail)
    letters, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    if letters != list("ABCDE"[: len(letters)]) or len(letters) < 2:
        return head.strip(), None
    return head.strip(), tuple(texts)


def read_llm_adapters_math(path: Path, *, letters: bool = False) -> list[Example]:
    """A math ``test.json`` in LLM-Adapters format; only ``answer`` is gold (numbers, or A-E when ``letters``)."""
    out = []
    for i, item in enumerate(_read_json(path)):
        try:
            instruction, answer = item["instruction"].strip(), str(item["answer"]).strip()
        except (KeyError, AttributeError) as exc:
            raise DataError(f"{path}[{i}]: missing field {exc}") from exc
        if letters:
            question, options = _aqua_options(instruction)
            labels = tuple("ABCDE"[: len(options)]) if options else None
            index = labels.index(answer) if labels and answer in labels else None
            out.append(Example(prompt=instruction, target=f"{MATH_PREFIX} {answer}.",
                               choices=options if index is not None else None, answer_index=index, gold=answer,
                               labels=labels if index is not None else None, question=question))
            continue
        value = extract_last_number(answer)
        if value is None:
            raise DataError(f"{path}[{i}]: answer {answer!r} is not a number")
        out.append(Example(prompt=instruction, target=f"{MATH_PREFIX} {_fmt_number(value)}.", choices=None,
                           answer_index=None, gold=_fmt_number(value), question=instruction))
    return out


def gsm8k_example(question: str, solution: str, where: str) -> Example:
    """GSM8K item: the rationale without ``<<calc>>`` annotations, ending ``The answer is N.``"""
    rationale, sep, final = solution.rpartition("####")
    value = extract_last_number(final)
    if not sep or value is None:
        raise DataError(f"{where}: GSM8K answer has no final '#### <number>' line")
    rationale = re.sub(r"<<[^>]*>>", "", rationale).strip()
    gold = _fmt_number(value)
    return Example(prompt=question.strip(), target=f"{rationale}\n{MATH_PREFIX} {gold}.", choices=None,
                   answer_index=None, gold=gold, question=question.strip())


def read_gsm8k(path: Path) -> list[Example]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    out = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if line.strip():
                row = json.loads(line)
                out.append(gsm8k_example(row["question"], row["answer"], f"{path}:{i + 1}"))
    return out


# ---------------------------------------------------------------------------------------------- PubMedQA
PUBMEDQA_LABELS = ("yes", "no", "maybe")


def pubmedqa_example(question: str, contexts: list[str], decision: str, where: str) -> Example:
    """PubMedQA (PQA-L) item; the prompt holds the abstract's context paragraphs, the label is yes/no/maybe."""
    if decision not in PUBMEDQA_LABELS:
        raise DataError(f"{where}: final_decision {decision!r} is not one of {PUBMEDQA_LABELS}")
    context = " ".join(c.strip() for c in contexts)
    prompt = ("Please answer the following question with yes, no or maybe, based on the context.\n\n"
              f"Context: {context}\n\nQuestion: {question.strip()}\n\nAnswer format: yes/no/maybe")
    return Example(prompt=prompt, target=f"{LABEL_PREFIX} {decision}", choices=PUBMEDQA_LABELS,
                   answer_index=PUBMEDQA_LABELS.index(decision), gold=decision, labels=PUBMEDQA_LABELS,
                   question=f"Context: {context}\nQuestion: {question.strip()}")


def read_pubmedqa(folder: Path) -> tuple[list[Example], list[Example]]:
    """``(train, test)``: the official 500-PMID test split and the other 500 labelled items, in file order."""
    items = _read_json(folder / "ori_pqal.json")
    test_ids = set(_read_json(folder / "test_ground_truth.json"))
    train, test = [], []
    for pmid, row in items.items():
        where = f"{folder}/ori_pqal.json[{pmid}]"
        ex = pubmedqa_example(row["QUESTION"], row["CONTEXTS"], row["final_decision"], where)
        (test if pmid in test_ids else train).append(ex)
    return train, test


# ---------------------------------------------------------------------------------------------- MMLU
def read_mmlu(folder: Path, subject: str, split: str) -> list[Example]:
    """``<folder>/<split>/<subject>_<split>.csv`` with header ``question,choice0..3,answer``."""
    path = folder / split / f"{subject}_{split}.csv"
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    out = []
    with path.open(encoding="utf-8", newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            try:
                options = [row[f"choice{k}"] for k in range(4)]
                out.append(choice_example(mc_item(row["question"], options, int(row["answer"])), f"{path}:{i + 2}"))
            except (KeyError, ValueError, TypeError) as exc:
                raise DataError(f"{path}:{i + 2}: not an MMLU row ({exc})") from exc
    return out
