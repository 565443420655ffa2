"""Row chunks of a micro-batch under a cap on padded positions, with the weights that keep its gradient.

A length-grouped micro-batch of ``B`` rows right-padded to ``T`` costs activation memory in proportion to ``B * T``
(about 1.4 MB per position for SmolLM2-135M with adapters on six projections in bf16). The intra-domain mix has a
median of 22 tokens and a maximum of 242, so one batch in hundreds is ten times the usual one and sets the peak.
``token_chunks`` cuts such a batch into consecutive row groups of at most ``max_tokens`` padded positions, each
trimmed to its own longest row.

The LM loss of a batch is the mean over its ``P`` response tokens, ``L = (1/P) sum_p l_p``. With chunk ``c``
holding ``P_c`` of them and its own mean ``L_c``, ``L = sum_c (P_c / P) L_c``: backpropagating ``(P_c / P) L_c``
per chunk accumulates exactly the batch's gradient (up to summation order). The balance loss is a per-forward
statistic; it gets the same weights, a token-weighted mean of the chunks' balance losses.
"""
from __future__ import annotations

import torch

from orchestrator.data.tokenize import IGNORE_INDEX


def response_tokens(labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` response tokens per row: labels scored after the one-position shift, as the loss scores them."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def token_chunks(batch: dict[str, torch.Tensor], max_tokens: int | None) -> list[tuple[dict[str, torch.Tensor], float]]:
    """``[(chunk, weight)]``: consecutive rows of ``batch`` in groups of at most ``max_tokens`` padded positions.

    Each chunk is cut to its longest row; a single row above the cap is a chunk of its own. ``weight`` is the
    chunk's share of the batch's response tokens (they sum to 1). ``max_tokens=None`` or a batch within the cap
    returns the batch itself with weight 1.
    """
    rows, width = batch["attention_mask"].shape
    if max_tokens is None or rows * width <= max_tokens:
        return [(batch, 1.0)]
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    groups, start, longest = [], 0, 0
    for row, n in enumerate(lengths):
        if row > start and (row - start + 1) * max(longest, n) > max_tokens:
            groups.append((start, row, longest))
            start, longest = row, 0
        longest = max(longest, n)
    groups.append((start, rows, longest))
    counts = response_tokens(batch["labels"])
    total = int(counts.sum())
    out = []
    for lo, hi, w in groups:
        chunk = {k: v[lo:hi, :w] for k, v in batch.items()}
        share = int(counts[lo:hi].sum()) / total if total else (hi - lo) / rows
        out.append((chunk, share))
    return out
