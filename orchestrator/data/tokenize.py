"""Prompt templates and tokenisation with the loss on the response only.

Templates:

- ``alpaca``: the Stanford-Alpaca template that LLM-Adapters trains and evaluates with (its own copies carry
  stray source-code indentation, normalised away here)::

      Below is an instruction that describes a task. Write a response that appropriately completes the request.

      ### Instruction:
      {instruction}

      ### Response:
      {target}<eos>

- ``chat``: the tokenizer's own chat template, one user turn and one assistant turn; the response is the
  assistant text through its end-of-turn token (e.g. ``...answer2<|im_end|>``).

Encoding: ``input_ids = prompt_ids + response_ids``, ``labels = [-100] * len(prompt_ids) + response_ids``.
When the pair is longer than ``max_length`` the prompt is cut from the left (keeping a leading BOS), never the
response; an item whose response alone does not fit (with at least one prompt token) is skipped: ``None``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from orchestrator.data.schema import DataError, Example

IGNORE_INDEX = -100
TEMPLATES = ("alpaca", "chat")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def _check_template(tokenizer, template: str) -> None:
    if template not in TEMPLATES:
        raise DataError(f"template={template!r} is unknown; use one of {list(TEMPLATES)}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError("template='chat' but this tokenizer has no chat template; use template='alpaca'")


def render_prompt(tokenizer, instruction: str, template: str = "alpaca") -> str:
    """The text the model sees before its response starts."""
    _check_template(tokenizer, template)
    if template == "alpaca":
        return ALPACA_PROMPT.format(instruction=instruction)
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                         add_generation_prompt=True)


def render_response(tokenizer, instruction: str, target: str, template: str = "alpaca") -> str:
    """The response text (for ``chat`` including the end-of-turn token; for ``alpaca`` eos is added as an id)."""
    _check_template(tokenizer, template)
    if template == "alpaca":
        return target
    prompt = render_prompt(tokenizer, instruction, template)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}, {"role": "assistant", "content": target}], tokenize=False
    )
    if not full.startswith(prompt):
        raise DataError("the chat template renders the user turn differently with and without a reply; "
                        "use template='alpaca'")
    response = full[len(prompt):]
    eos = tokenizer.eos_token
    if eos and eos in response:
        response = response[: response.index(eos) + len(eos)]
    return response


def prompt_ids(tokenizer, instruction: str, template: str = "alpaca") -> list[int]:
    """Token ids of the rendered prompt (special tokens from the tokenizer for alpaca, from the text for chat)."""
    text = render_prompt(tokenizer, instruction, template)
    return tokenizer(text, add_special_tokens=template == "alpaca")["input_ids"]


def encode_example(tokenizer, ex: Example, *, template: str = "alpaca", max_length: int = 512) -> dict | None:
    """``{"input_ids", "labels", "attention_mask"}`` (lists of equal length <= max_length) or ``None``."""
    if max_length < 2:
        raise DataError(f"max_length={max_length} must be at least 2")
    prompt = prompt_ids(tokenizer, ex.prompt, template)
    response = tokenizer(render_response(tokenizer, ex.prompt, ex.target, template),
                         add_special_tokens=False)["input_ids"]
    if template == "alpaca" and tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    return fit_pair(tokenizer, prompt, response, max_length)


def fit_context(context: Sequence[int], reserved: int, max_length: int, bos_id: int | None) -> list[int] | None:
    """``context`` cut from the left to at most ``max_length - reserved`` tokens, keeping a leading BOS; None when
    not even one context token fits (``reserved + 1 > max_length``).

    The one truncation of a (prompt, response) row: training (:func:`fit_pair`, with ``data.max_length``) and
    scoring (``orchestrator.evaluation.scoring.fit_requests``) both call it, so a long item is cut to the same
    tokens in the row it is trained on and the row it is scored on. With ``keep = max_length - reserved``::

        len(context) <= keep           -> context
        context[0] == BOS and keep > 1 -> [BOS] + context[-(keep - 1):]
        otherwise                      -> context[-keep:]
    """
    keep = max_length - reserved
    if keep < 1:
        return None
    context = list(context)
    if len(context) <= keep:
        return context
    if bos_id is not None and context[0] == bos_id and keep > 1:
        return [bos_id] + context[len(context) - keep + 1:]
    return context[len(context) - keep:]


def fit_pair(tokenizer, prompt: list[int], response: list[int], max_length: int) -> dict | None:
    """``{"input_ids", "labels", "attention_mask"}`` of ``prompt + response`` with the loss on the response, the
    prompt cut by :func:`fit_context` to fit ``max_length``; None when the response cannot fit."""
    prompt = fit_context(prompt, len(response), max_length, tokenizer.bos_token_id)
    if prompt is None:
        return None
    ids = prompt + response
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt) + response, "attention_mask": [1] * len(ids)}


def encode_examples(tokenizer, examples: Sequence[Example], *, template: str = "alpaca", max_length: int = 512
                    ) -> tuple[list[dict], int]:
    """Encode many; returns ``(encoded, n_dropped)`` where dropped items are those whose answer cannot fit."""
    encoded, dropped = [], 0
    for ex in examples:
        item = encode_example(tokenizer, ex, template=template, max_length=max_length)
        if item is None:
            dropped += 1
        else:
            encoded.append(item)
    return encoded, dropped


def collate(batch: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded items to ``(B, T_max)`` tensors: pad_id / -100 / 0."""
    if not batch:
        raise ValueError("collate() got an empty batch")
    width = max(len(b["input_ids"]) for b in batch)
    out = {
        "input_ids": torch.full((len(batch), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(batch), width), dtype=torch.long),
    }
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        out["input_ids"][row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
        out["labels"][row, :n] = torch.tensor(item["labels"], dtype=torch.long)
        out["attention_mask"][row, :n] = 1
    return out
