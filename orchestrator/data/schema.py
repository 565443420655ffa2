"""The one item type every loader produces, and the one error type users see."""
from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """A data problem the user can fix (missing file, bad task name, offline Hub); the message names the path."""


@dataclass(frozen=True)
class Example:
    """One task item, independent of template and tokenizer.

    prompt:       the instruction text (LLM-Adapters style; the template wraps it, see ``tokenize.render_prompt``).
    target:       the response the model is trained to produce, e.g. ``"the correct answer is answer2"``.
    choices:      option texts of a multiple-choice item (``None`` for free-form answers).
    answer_index: 0-based index of the gold option (``None`` for free-form answers).
    gold:         the gold answer as a string: the label word (``"answer2"``, ``"true"``) or the number (``"18"``).
    labels:       the label word of each option (``("answer1", ..., "answer4")``), parallel to ``choices``.
    question:     the bare stem without the option list, used by the cloze ("text") formulation of scoring.
    """

    prompt: str
    target: str
    choices: tuple[str, ...] | None
    answer_index: int | None
    gold: str
    labels: tuple[str, ...] | None = None
    question: str | None = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            assert self.answer_index is not None and 0 <= self.answer_index < len(self.choices), self
            assert self.labels is None or len(self.labels) == len(self.choices), self
