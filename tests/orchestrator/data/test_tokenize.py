"""Templates, response-only labels, and truncation that never drops the answer."""
from __future__ import annotations

import pytest
import torch

from orchestrator.data.schema import DataError, Example
from orchestrator.data.tasks import load_task
from orchestrator.data.tokenize import (
    IGNORE_INDEX,
    collate,
    encode_example,
    encode_examples,
    render_prompt,
    render_response,
)
from orchestrator.models.loading import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


EX = Example("Please answer the following question with true or false, question: is the sky blue?\n\n"
             "Answer format: true/false", "the correct answer is true", ("true", "false"), 0, "true",
             ("true", "false"), "is the sky blue?")


def test_known_item_renders_to_the_exact_alpaca_prompt(shared_data_dir, tok):
    _, piqa = load_task("piqa", shared_data_dir)
    assert render_prompt(tok, piqa[0].prompt, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nPlease choose the correct solution to the question: How do I ready a guinea pig cage "
        "for it's new occupants?\n\nSolution1: Provide the guinea pig with a cage full of a few inches of bedding "
        "made of ripped paper strips, you will also need to supply it with a water bottle and a food dish.\n\n"
        "Solution2: Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans "
        "material, you will also need to supply it with a water bottle and a food dish.\n\n"
        "Answer format: solution1/solution2\n\n### Response:\n"
    )
    assert piqa[0].target == "the correct answer is solution1"


def test_alpaca_labels_cover_only_the_response(tok):
    enc = encode_example(tok, EX, template="alpaca", max_length=512)
    prompt_len = len(tok(render_prompt(tok, EX.prompt))["input_ids"])
    assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["attention_mask"])
    assert enc["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    response = enc["labels"][prompt_len:]
    assert response == enc["input_ids"][prompt_len:] and response[-1] == tok.eos_token_id
    assert tok.decode(response[:-1]) == "the correct answer is true"


def test_chat_template_response_ends_with_end_of_turn(tok):
    assert render_prompt(tok, "Q?", "chat") == "<s>user\nQ?</s>\n<s>assistant\n"
    assert render_response(tok, "Q?", "the correct answer is true", "chat") == "the correct answer is true</s>"
    enc = encode_example(tok, EX, template="chat", max_length=512)
    kept = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert tok.decode(kept) == "the correct answer is true</s>"
    assert enc["input_ids"][-len(kept):] == kept


def test_truncation_cuts_the_prompt_from_the_left_never_the_answer(tok):
    full = encode_example(tok, EX, max_length=512)
    n_resp = sum(t != IGNORE_INDEX for t in full["labels"])
    short = encode_example(tok, EX, max_length=n_resp + 5)
    assert len(short["input_ids"]) == n_resp + 5
    assert short["input_ids"][-n_resp:] == full["input_ids"][-n_resp:]  # whole answer kept
    assert short["input_ids"][:5] == full["input_ids"][-n_resp - 5:-n_resp]  # the prompt's *end* kept
    assert encode_example(tok, EX, max_length=n_resp + 1)["labels"][0] == IGNORE_INDEX
    assert encode_example(tok, EX, max_length=n_resp) is None  # answer plus one prompt token cannot fit


def test_encode_examples_counts_dropped(tok):
    long_answer = Example("q", "word " * 200, None, None, "x")
    encoded, dropped = encode_examples(tok, [EX, long_answer, EX], max_length=64)
    assert (len(encoded), dropped) == (2, 1)


def test_collate_pads_right(tok):
    a = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]}
    b = {"input_ids": [8], "labels": [8], "attention_mask": [1]}
    out = collate([a, b], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["input_ids"].dtype == torch.long


def test_template_errors(tok):
    with pytest.raises(DataError, match="template='vicuna' is unknown"):
        render_prompt(tok, "x", "vicuna")
    no_chat = build_tiny_tokenizer()
    no_chat.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        encode_example(no_chat, EX, template="chat")
