"""Scoring mechanics: option log-likelihoods and greedy generation, batched and deterministic.

Log-likelihood of a continuation ``c = (c_1..c_n)`` after a context ``x`` (lm-eval's ``loglikelihood``)::

    LL(c | x) = sum_i log p(c_i | x, c_<i)

A multiple-choice item is answered by ``argmax_k LL(c_k | x_k)`` (``acc``) and by
``argmax_k LL(c_k | x_k) / bytes(c_k)`` (``acc_norm``, lm-eval's length normalisation by UTF-8 byte length).

Batching: each request becomes one row; rows are sorted by length (longest first, ties by request order),
left-padded to ``(B, T)`` with ``position_ids = cumsum(mask) - 1`` so padding does not shift positions. The LM
head runs only at the scored positions: for an HF causal LM split as ``logits = head(backbone(x))``
(``lm_parts``, ``final_hidden``) the final hidden states ``h`` (B, T, H) are gathered at the last ``n_b``
positions of each row b (``n_b`` = its longest target), ``P = sum_b n_b`` rows of (P, H), and only
``head(h_P)`` (P, V) and its log-softmax are computed; other models get the last ``max_b n_b`` positions
(``logits_to_keep``). When all options of an item share the context and differ only in their last token
(label words such as ``answer1``/``answer2``, ``true``/``false``) one row serves every option: the last
position's distribution scores all of them. When all options share the context but differ in more than their last
token (the cloze formulation), :func:`shared_context_logprobs` runs the context once and continues every option
from its key/value cache. Results do not depend on the batch size beyond floating-point summation order.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import weakref

import torch
from torch import nn

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


_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(backbone, head)`` with ``model(x).logits == head(backbone(x).last_hidden_state)``, or None.

    For an HF causal LM the backbone is the module its own forward calls (``model.get_decoder()`` or
    ``model.base_model``: ``model.model`` for LLaMA, ``model.transformer`` for GPT-2, ``model.model.decoder``
    for OPT; it holds the final norm where there is one) and the head is
    ``model.get_output_embeddings()`` (tied or not). The model must take ``logits_to_keep`` (see
    ``final_hidden``). Models that transform the logits after the head (Gemma's soft-capping, Cohere's
    ``logit_scale``), or whose split does not reproduce their own logits on a short probe sequence (checked
    once per model, in eval mode, without gradients), get None: callers then use the model's own logits. The
    probe is a real forward of 7 tokens, so routed adapter layers count them in their routing statistics; the
    trial loop verifies when it builds its loss module, before any statistics are reset and read.
    """
    if model in _VERIFIED:
        return _VERIFIED[model]
    parts = None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    transformed = any(getattr(config, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale"))
    if head is not None and not transformed and _accepts(model, "logits_to_keep"):
        for backbone in _backbones(model):
            if _split_reproduces(model, backbone, head):
                parts = (backbone, head)
                break
    _VERIFIED[model] = parts
    return parts


def _backbones(model: nn.Module) -> list[nn.Module]:
    """Candidates for the module whose output feeds the head: the decoder (OPT's forward calls
    ``model.model.decoder``), then ``base_model`` (LLaMA's ``model.model``, GPT-2's ``model.transformer``)."""
    found = []
    try:
        found.append(model.get_decoder())
    except (AttributeError, NotImplementedError, ValueError):
        pass
    found.append(getattr(model, "base_model", None))
    out = []
    for m in found:
        if isinstance(m, nn.Module) and m is not model and all(m is not o for o in out):
            out.append(m)
    return out


@contextlib.contextmanager
def _capture_output(backbone: nn.Module):
    """Collects the final hidden states (B, T, H) that ``backbone`` returns while the context is open."""
    seen: list[torch.Tensor] = []

    def keep(_module, _args, out):
        seen.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

    handle = backbone.register_forward_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def _split_reproduces(model: nn.Module, backbone: nn.Module, head: nn.Module) -> bool:
    was_training = model.training
    model.eval()  # dropout off: the logits and the captured hidden states come from one deterministic forward
    try:
        param = next(model.parameters())
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
        ids = (torch.arange(7, device=param.device) * 31 + 3).remainder(vocab).unsqueeze(0)  # (1, 7)
        with _capture_output(backbone) as seen:
            full = model(input_ids=ids).logits.float()
        if len(seen) != 1:
            return False
        split = head(seen[0]).float()
        return full.shape == split.shape and torch.allclose(full, split, rtol=1e-3, atol=1e-3 * full.abs().max())
    except (TypeError, AttributeError, ValueError, RuntimeError, IndexError):
        return False
    finally:
        model.train(was_training)


def final_hidden(model: nn.Module, backbone: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, T, H) of ``model(**inputs)``, with the head applied to no position.

    The call goes through the model's own forward (so its forward hooks run: malora's routing context reads the
    attention mask there and keeps padding out of routing) with ``logits_to_keep`` an empty index tensor, so the
    head computes (B, 0, V) logits; the backbone's output is captured by a temporary forward hook.
    """
    if _accepts(model, "use_cache"):
        inputs["use_cache"] = False  # no KV cache object is built for a single forward
    return _forward_without_head(model, backbone, **inputs)[1]


def _forward_without_head(model: nn.Module, backbone: nn.Module, **inputs: Any) -> tuple[Any, torch.Tensor]:
    """``(model output, final hidden states (B, T, H))`` of ``model(**inputs)`` with ``logits_to_keep`` an empty
    index tensor (the head runs on no position); the output keeps the KV cache when ``inputs`` ask for one."""
    nothing = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    with _capture_output(backbone) as seen:
        out = model(**inputs, logits_to_keep=nothing)
    return out, seen[-1]


@torch.no_grad()
def continuation_logprobs(model, rows: Sequence[Row], *, batch_size: int, pad_id: int) -> dict[int, float]:
    """``LL(continuation | context)`` per request index, for every target of every row."""
    device = next(model.parameters()).device
    parts = lm_parts(model)
    keep_ok, pos_ok = _accepts(model, "logits_to_keep"), _accepts(model, "position_ids")
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].input_ids), i))
    out: dict[int, float] = {}
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start:start + batch_size]]
        ids, mask = _left_pad([r.input_ids for r in batch], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        need = [max(len(t) for _, t in r.targets) for r in batch]  # scored positions per row: its last need[b]
        width = ids.shape[1]
        offsets = [0]
        for n in need:  # row b's scored positions are rows offsets[b]:offsets[b + 1] of the (P, V) log-probs
            offsets.append(offsets[-1] + n)
        if parts is not None:
            backbone, head = parts
            inputs = {"input_ids": ids, "attention_mask": mask, **({"position_ids": positions} if pos_ok else {})}
            hidden = final_hidden(model, backbone, **inputs)                                  # (B, T, H)
            rows_idx = torch.tensor([b for b, n in enumerate(need) for _ in range(n)], device=device)
            cols_idx = torch.tensor([width - n + k for n in need for k in range(n)], device=device)
            logp = torch.log_softmax(head(hidden[rows_idx, cols_idx]).float(), dim=-1).cpu()  # (P, V)
        else:
            keep = max(need)
            kwargs = {"input_ids": ids, "attention_mask": mask}
            if pos_ok:
                kwargs["position_ids"] = positions
            if keep_ok:
                kwargs["logits_to_keep"] = keep
            logits = model(**kwargs).logits[:, -keep:, :]  # (B, keep, V)
            full = torch.log_softmax(logits.float(), dim=-1).cpu()
            logp = torch.cat([full[b, keep - n:] for b, n in enumerate(need)])  # (P, V), the same layout
        for b, row in enumerate(batch):
            end = offsets[b + 1]  # a target of n tokens is predicted by the row's last n scored positions
            for req, target in row.targets:
                n = len(target)
                picked = logp[end - n:end].gather(-1, torch.tensor(target).unsqueeze(-1))  # (n, 1)
                out[req] = float(picked.sum())
    return out


def _shares_context(options: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int) -> bool:
    """The options share one context that fits, are not label words (options that differ only in their last
    token: :func:`build_rows` already scores those with one row), and the context is worth caching: the K - 1
    context copies it saves are at least the option tokens it runs (PIQA's short goals and long solutions are
    cheaper as sorted rows, whose padding is smaller than that of an item's options)."""
    ctx, conts = list(options[0][0]), [list(k) for _, k in options]
    label_words = len({len(k) for k in conts}) == 1 and all(k[:-1] == conts[0][:-1] for k in conts)
    return (len(options) > 1 and len(ctx) > 0 and not label_words and all(list(c) == ctx for c, _ in options)
            and len(ctx) + max(len(k) for k in conts) <= max_length + 1
            and (len(options) - 1) * len(ctx) >= sum(len(k) - 1 for k in conts))


@torch.no_grad()
def shared_context_logprobs(model, requests: Sequence[Sequence[tuple[list[int], list[int]]]], *, batch_size: int,
                            pad_id: int, max_length: int) -> dict[int, float]:
    """``LL(continuation | context)`` per flat request index, with each item's shared context run once.

    The cloze formulation scores K options of an item after one context x (T_x tokens). One row per option runs
    the context K times; here the context runs once with a key/value cache and the K continuations run from
    (copies of) that cache::

        pass 1:  x (B, T_x), left-padded                 -> cache, log p(c_k,1 | x) from the last position
        pass 2:  c_k,<n_k (R, W), right-padded, cache    -> log p(c_k,i | x, c_k,<i), i = 2..n_k

    with ``position_ids`` continuing after each item's real context length, so every log-probability is the one
    of the row ``x + c_k`` (equal to fp32 summation order; ``tests/orchestrator/evaluation`` checks it against
    :func:`continuation_logprobs`). Items are grouped by K and sorted by context length, ``batch_size`` items per
    pass 1; their B*K option rows are sorted by length and run ``batch_size`` rows (R) per pass 2, each chunk from
    a copy of the cache that holds its rows' contexts. Items whose options do not share one context (WinoGrande),
    that would need truncation, or whose context is shorter than their options (``_shares_context``) take the
    one-row-per-option path (:func:`build_rows`, :func:`continuation_logprobs`), as do all items of a model whose
    forward takes no key/value cache.
    """
    device = next(model.parameters()).device
    pos_ok, keep_ok = _accepts(model, "position_ids"), _accepts(model, "logits_to_keep")
    cache_key = "cache" if _accepts(model, "cache") else "past_key_values"  # transformers >= 5.2x renamed it
    starts, flat = [], 0
    for options in requests:
        starts.append(flat)
        flat += len(options)
    cacheable = _accepts(model, "use_cache") and _accepts(model, cache_key)
    shared = [i for i, options in enumerate(requests) if cacheable and _shares_context(options, max_length)]
    rest = [i for i in range(len(requests)) if i not in set(shared)]
    out: dict[int, float] = {}
    if rest:  # the row path numbers its requests 0.. over the items it gets: map them back
        sub = continuation_logprobs(model, build_rows([requests[i] for i in rest], max_length),
                                    batch_size=batch_size, pad_id=pad_id)
        local = [starts[i] + k for i in rest for k in range(len(requests[i]))]
        out.update({local[j]: v for j, v in sub.items()})
    parts = lm_parts(model)
    by_k: dict[int, list[int]] = {}
    for i in shared:
        by_k.setdefault(len(requests[i]), []).append(i)
    for k, items in sorted(by_k.items()):
        items.sort(key=lambda i: (-len(requests[i][0][0]), i))
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            ids, mask = _left_pad([requests[i][0][0] for i in batch], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
            if pos_ok:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            if parts is not None:  # the head on (B, H) rows: one GEMM (see _last_position_logits)
                first, last = _last_position_logits(model, parts, kwargs)
            else:
                if keep_ok:
                    kwargs["logits_to_keep"] = 1
                first = model(**kwargs)
                last = first.logits[:, -1, :]
            first_logp = torch.log_softmax(last.float(), dim=-1).cpu()                         # (B, V)
            conts = [list(cont) for i in batch for _, cont in requests[i]]                     # B*K, item-major
            for row, cont in enumerate(conts):
                out[starts[batch[row // k]] + row % k] = float(first_logp[row // k, cont[0]])
            # pass 2 in chunks of batch_size option rows of similar length (little right padding), each from a
            # copy of the cache holding its rows' contexts
            order = sorted((r for r, c in enumerate(conts) if len(c) > 1), key=lambda r: (-len(conts[r]), r))
            for at in range(0, len(order), batch_size):
                chunk = order[at:at + batch_size]
                tails = _continue_from_cache(model, parts, getattr(first, cache_key), cache_key, mask,
                                             [r // k for r in chunk], [conts[r] for r in chunk], pad_id, pos_ok)
                for r, value in zip(chunk, tails):
                    out[starts[batch[r // k]] + r % k] += value
    return out


def _last_position_logits(model, parts, kwargs: dict) -> tuple[Any, torch.Tensor]:
    """``(model output with its cache, logits (B, V) at the last position)`` of a left-padded batch.

    The head runs on the 2-D ``(B, H)`` rows of the backbone's last position. HF's own ``logits_to_keep=1`` hands
    the head the 3-D slice ``h[:, -1:, :]`` (strides ``(T H, H, 1)``), which ``torch.matmul`` can only fold into one
    GEMM when autograd needs it; with a frozen head under ``no_grad`` it broadcasts the (V, H) head to ``(B, H, V)``
    and runs ``bmm`` on that copy: 1.2 s per batch for SmolLM2's 49152 x 576 head, 7x the whole zero-shot item.
    """
    backbone, head = parts
    out, hidden = _forward_without_head(model, backbone, **kwargs)
    return out, head(hidden[:, -1, :])


def _cache_rows(cache, rows: torch.Tensor):
    """A cache holding batch rows ``rows`` of ``cache`` (repeats allowed); ``cache`` itself is left unchanged
    (the copy's layers get new tensors from indexing, and a forward replaces them rather than writing into them)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        out = copy.copy(cache)
        out.layers = [copy.copy(layer) for layer in layers]
    else:
        out = copy.deepcopy(cache)
    out.batch_select_indices(rows)
    return out


def _continue_from_cache(model, parts, cache, cache_key: str, ctx_mask: torch.Tensor, items: list[int],
                         conts: list[list[int]], pad_id: int, pos_ok: bool) -> list[float]:
    """``sum_{i>=2} log p(c_i | x, c_<i)`` per continuation ``c = conts[j]`` (at least 2 tokens) after the cached
    context of batch row ``items[j]`` (``ctx_mask`` (B, T_x) its left-padded mask)."""
    device = ctx_mask.device
    width = max(len(c) for c in conts) - 1
    tail = torch.full((len(conts), width), pad_id, dtype=torch.long)
    tail_mask = torch.zeros((len(conts), width), dtype=torch.long)
    for row, cont in enumerate(conts):
        tail[row, :len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
        tail_mask[row, :len(cont) - 1] = 1
    tail, tail_mask = tail.to(device), tail_mask.to(device)
    rows = torch.tensor(items, device=device)
    mask = ctx_mask[rows]                                                                          # (R, T_x)
    kwargs = {"input_ids": tail, cache_key: _cache_rows(cache, rows), "use_cache": True,
              "attention_mask": torch.cat([mask, tail_mask], dim=1)}
    if pos_ok:
        kwargs["position_ids"] = mask.sum(-1, keepdim=True) + torch.arange(width, device=device)  # (R, W)
    real = tail_mask.bool()
    if parts is not None:
        backbone, head = parts
        _, hidden = _forward_without_head(model, backbone, **kwargs)
        logp = torch.log_softmax(head(hidden[real]).float(), dim=-1).cpu()                        # (P, V)
    else:
        logp = torch.log_softmax(model(**kwargs).logits[real].float(), dim=-1).cpu()               # (P, V)
    out, offset = [], 0
    for cont in conts:
        n = len(cont) - 1
        out.append(float(logp[offset:offset + n].gather(-1, torch.tensor(cont[1:]).unsqueeze(-1)).sum()))
        offset += n
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
