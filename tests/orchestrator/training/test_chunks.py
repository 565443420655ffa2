"""token_chunks: row chunks under a cap on padded positions whose weighted losses give the whole batch's gradient."""
from __future__ import annotations

import pytest
import torch

from orchestrator.training.chunks import token_chunks
from orchestrator.training.loss import ResponseLoss
from tests.orchestrator.training.test_loss import batch, grads, llama


def test_chunks_respect_the_cap_and_cover_every_row_once():
    data = batch()  # (4, 12), rows of 4, 11, 7, 8 real tokens
    pieces = token_chunks(data, 20)
    assert [tuple(p["input_ids"].shape) for p, _ in pieces] == [(1, 4), (1, 11), (2, 8)]
    assert torch.equal(torch.cat([p["input_ids"][:, :4] for p, _ in pieces]), data["input_ids"][:, :4])
    # weights: response tokens per chunk (1 | 4 | 2 + 4) over the batch's 11
    assert [w for _, w in pieces] == pytest.approx([1 / 11, 4 / 11, 6 / 11])


def test_a_batch_within_the_cap_or_no_cap_is_returned_whole():
    data = batch()
    for cap in (None, 48):
        (piece, weight), = token_chunks(data, cap)
        assert piece is data and weight == 1.0


def test_a_row_above_the_cap_is_its_own_chunk():
    data = batch()
    pieces = token_chunks(data, 8)  # the 11-token row alone exceeds it
    assert [tuple(p["input_ids"].shape) for p, _ in pieces] == [(1, 4), (1, 11), (1, 7), (1, 8)]


@pytest.mark.parametrize("cap", [8, 20, 30])
def test_weighted_chunk_losses_give_the_whole_batch_gradient(cap):
    torch.manual_seed(0)
    model = llama(False).double()
    loss = ResponseLoss(model)
    data = batch(1)
    loss(**data).backward()
    whole = grads(model)
    total = 0.0
    for piece, weight in token_chunks(data, cap):
        part = loss(**piece) * weight
        part.backward()
        total += part.item()
    chunked = grads(model)
    assert total == pytest.approx(loss(**data).item(), rel=1e-12)
    assert whole.keys() == chunked.keys()
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-10, atol=1e-12)
