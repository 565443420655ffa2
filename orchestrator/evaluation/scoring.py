"""Scoring mechanics: option log-likelihoods and greedy generation, batched and deterministic.

Log-likelihood of a continuation ``c = (c_1..c_n)`` after a context ``x`` (lm-eval's ``loglikelihood``)::

    LL(c | x) = sum_i log p(c_i | x, c_<i)

A multiple-choice item is answered by ``argmax_k LL(c_k | x_k)`` (``acc``) and by
``argmax_k LL(c_k | x_k) / bytes(c_k)`` (``acc_norm``, lm-eval's length normalisation by UTF-8 byte length).

Batching: each request becomes one row; rows are sorted by length (longest first, ties by request order),
left-padded to ``(B, T)`` with ``position_ids = cumsum(mask) - 1`` so padding does not shift positions, and
only the last ``max_i n_i`` positions' logits are computed (``logits_to_keep``). When all options of an item
share the context and differ only in their last token (label words such as ``answer1``/``answer2``,
``true``/``false``) one row serves every option: the last position's distribution scores all of them. Results
do not depend on the batch size beyond floating-point summation order.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from orchestrator.data.loaders import extract_last_number

NUMBER_TOLERANCE = 1e-3  # LLM-Adapters' rule: |pred - gold| <= 0.001


@dataclass(frozen=True)
class Row:
    """One forward pass: ``input_ids`` (length T) and, per option it serves, the ids its last n positions predict."""

    input_ids: tuple[int, ...]
    targets: tuple[tuple[int, tuple[int, ...]], ...]  # (request index, continuation ids)


def build_rows(requests: Sequence[Sequence[tuple[list[int], list[int]]]], max_length: int) -> list[Row]:
    """Rows for ``requests[item] = [(context_ids, continuation_ids) per option]``; request index = flat position.

    Sequences longer than ``max_length + 1`` lose context tokens from the left (never continuation tokens).
    """
    rows, flat = [], 0
    for options in requests:
        seqs = []
        for ctx, cont in options:
            if not cont:
                raise ValueError("empty continuation: nothing to score")
            seq = list(ctx) + list(cont)
            seqs.append(seq[-(max_length + 1):] if len(seq) > max_length + 1 else seq)
        shared = len({len(s) for s in seqs}) == 1 and all(s[:-1] == seqs[0][:-1] for s in seqs) and all(
            len(c) <= len(seqs[0]) - 1 for _, c in options)
        if shared and len(seqs) > 1:
            rows.append(Row(tuple(seqs[0][:-1]), tuple((flat + k, tuple(c)) for k, (_, c) in enumerate(options))))
        else:
            for k, ((_, cont), seq) in enumerate(zip(options, seqs)):
                rows.append(Row(tuple(seq[:-1]), ((flat + k, tuple(cont[-(len(seq) - 1):])),)))
        flat += len(options)
    return rows


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def continuation_logprobs(model, rows: Sequence[Row], *, batch_size: int, pad_id: int) -> dict[int, float]:
    """``LL(continuation | context)`` per request index, for every target of every row."""
    device = next(model.parameters()).device
    keep_ok, pos_ok = _accepts(model, "logits_to_keep"), _accepts(model, "position_ids")
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].input_ids), i))
    out: dict[int, float] = {}
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start:start + batch_size]]
        ids, mask = _left_pad([r.input_ids for r in batch], pad_id)
        keep = max(len(t) for r in batch for _, t in r.targets)  # positions whose logits we need
        kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if pos_ok:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        if keep_ok:
            kwargs["logits_to_keep"] = keep
        logits = model(**kwargs).logits[:, -keep:, :]  # (B, keep, V)
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for b, row in enumerate(batch):
            for req, target in row.targets:
                n = len(target)
                picked = logp[b, keep - n:, :].gather(-1, torch.tensor(target).unsqueeze(-1))  # (n, 1)
                out[req] = float(picked.sum())
    return out


def pick(scores: Sequence[float]) -> int:
    """Index of the maximum (first on ties, so results are deterministic)."""
    return max(range(len(scores)), key=lambda k: (scores[k], -k))


# ---------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int,
             eos_ids: Sequence[int] | None = None) -> list[str]:
    """Greedy continuations of tokenised prompts (left-padded batches, sorted by length), decoded without specials."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = list(eos_ids) if eos_ids else ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    texts: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = _left_pad([prompts[i] for i in idx], pad_id)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos)
        new = out[:, ids.shape[1]:].cpu()
        for i, seq in zip(idx, new):
            texts[i] = tokenizer.decode(seq, skip_special_tokens=True)
    return [texts[i] for i in range(len(prompts))]


def parse_label(text: str, labels: Sequence[str]) -> int | None:
    """LLM-Adapters' rule: the first label word (whole word, case-insensitive) in the generated text."""
    alternatives = "|".join(re.escape(lab) for lab in sorted(labels, key=len, reverse=True))
    m = re.search(rf"\b({alternatives})\b", text.lower())
    return [lab.lower() for lab in labels].index(m.group(1)) if m else None


def parse_letter(text: str, letters: Sequence[str] = tuple("ABCDE")) -> int | None:
    """AQuA: the last standalone capital letter among ``letters`` (e.g. ``(D)`` or ``answer is D``)."""
    found = [c for c in re.findall(r"\b([A-Z])\b", text) if c in letters]
    return list(letters).index(found[-1]) if found else None


def number_correct(text: str, gold: str) -> bool:
    """The last number in the generation equals the gold number within ``NUMBER_TOLERANCE``."""
    pred, ref = extract_last_number(text), extract_last_number(gold)
    return pred is not None and ref is not None and abs(pred - ref) <= NUMBER_TOLERANCE
