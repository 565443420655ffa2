"""Scoring mechanics: option log-likelihoods and greedy generation, batched and deterministic.

Log-likelihood of a continuation ``c = (c_1..c_n)`` after a context ``x`` (lm-eval's ``loglikelihood``)::

    LL(c | x) = sum_i log p(c_i | x, c_<i)

A multiple-choice item is answered by ``argmax_k LL(c_k | x_k)`` (``acc``) and by
``argmax_k LL(c_k | x_k) / len(choice_k)`` (``acc_norm``: lm-eval's normalisation by the characters of the
option's ``doc_to_choice`` string, ``orchestrator.evaluation.accuracy.choice_lengths``).

Length (:func:`fit_requests`): each (context, continuation) pair is cut as training cuts the item's row
(``orchestrator.data.cloze.fit_cloze_pair``: the continuation whole, the context from the left with BOS kept,
``max_length`` tokens with the eos training appends). An item with an option whose continuation alone does not
fit is not scored: it is counted, logged and returned as None (its pick is then -1, never a silent score).

Packing (:func:`option_logprobs`): the options of an item that share a context form a *group*: the context once,
then the options' tokens but their last as a prefix tree (one position per distinct prefix, so options that begin
alike, such as PIQA's minimal pairs, share those positions; unrelated options are separate branches)::

    [x_1 .. x_T | c1_1 .. c1_{n1-1} | c2_1 .. c2_{n2-1} | ...]      positions 0..T-1, then T.. again per branch

A (L, L) attention mask lets a position see its group's context and its own ancestors in the tree only, and
``position_ids`` continue from T along every branch, so each option's log-probabilities are those of the plain
row ``x + c_k`` (to fp32 summation order). Groups (sorted by length, longest first) are packed first-fit into rows
of ``pack_tokens`` positions, ``batch_size`` rows per forward, right-padded to the longest (padding attends to
nothing and is gathered from nowhere). The LM head runs only at the positions that predict an option token: for
an HF causal LM split as ``logits = head(backbone(x))`` (:func:`lm_parts`) the hidden states ``h`` (B, L, H) are
gathered at those P distinct positions (the context's last position once per group, shared by its K options) and
only ``head(h_P)`` (P, V) and its float32 log-softmax are computed; other models' full logits are
gathered. So nothing is padded to an item's longest option, no context runs twice, and no position outside the
continuations meets the (V, H) head.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import weakref

import torch
from torch import nn

from orchestrator.data.cloze import fit_cloze_pair
from orchestrator.data.loaders import extract_last_number

logger = logging.getLogger(__name__)
NUMBER_TOLERANCE = 1e-3  # LLM-Adapters' rule: |pred - gold| <= 0.001
PACK_TOKENS = 256
"""Positions per packed row: long enough to hold several items, short enough that the (L, L) attention over
positions of other items (masked, but computed) stays small beside the row's GEMMs."""
HEAD_CHUNK = 512  # scored positions per head GEMM and log-softmax: bounds the (P, V) float32 buffer

Request = tuple[list[int], list[int]]  # (context ids, continuation ids) of one option


def fit_requests(tokenizer, requests: Sequence[Sequence[Request]], max_length: int, *, name: str = "items"
                 ) -> list[list[Request] | None]:
    """Each item's (context, continuation) pairs cut to the row training uses (``fit_cloze_pair``), or None
    for an item with an option whose continuation alone does not fit ``max_length``; such items are counted in
    one warning naming ``name`` and their positions."""
    out, unfit = [], []
    for i, options in enumerate(requests):
        fitted = [fit_cloze_pair(tokenizer, ctx, cont, max_length) for ctx, cont in options]
        if any(f is None for f in fitted):
            out.append(None)
            unfit.append(i)
        else:
            out.append(fitted)
    if unfit:
        logger.warning("%s: %d of %d items not scored: an option's continuation alone exceeds max_length=%d "
                       "(items %s); they count as unanswered (pick -1). Fix: raise data.max_length", name,
                       len(unfit), len(requests), max_length, unfit[:20])
    return out


@dataclass(frozen=True)
class Group:
    """A context and the options scored after it: ``options[k] = (request index, continuation ids)``."""

    context: tuple[int, ...]
    options: tuple[tuple[int, tuple[int, ...]], ...]

    @property
    def length(self) -> int:
        """Positions the group takes in a packed row: the context, then one per distinct option prefix
        ``c[:i]`` (1 <= i < len(c)): options that begin alike share those positions (:func:`_layout`)."""
        return len(self.context) + len({c[:i] for _, c in self.options for i in range(1, len(c))})


def build_groups(requests: Sequence[Sequence[Request]]) -> list[Group]:
    """Groups of ``requests[item] = [(context, continuation) per option]``, request index = flat position;
    the options of an item with one context form one group (WinoGrande's options one group each)."""
    groups, flat = [], 0
    for options in requests:
        by_context: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
        for k, (ctx, cont) in enumerate(options):
            if not cont:
                raise ValueError("empty continuation: nothing to score")
            if not ctx:
                raise ValueError("empty context: the first continuation token has no position to be read from")
            by_context.setdefault(tuple(ctx), []).append((flat + k, tuple(cont)))
        groups += [Group(ctx, tuple(opts)) for ctx, opts in by_context.items()]
        flat += len(options)
    return groups


def pack(groups: Sequence[Group], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of ``groups`` per row, each row's lengths summing to at most ``capacity``
    (a longer group gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for g in sorted(range(len(groups)), key=lambda i: (-groups[i].length, i)):
        n = groups[g].length
        at = next((r for r, free in enumerate(room) if free >= n), None)
        if at is None:
            rows.append([g])
            room.append(capacity - n)
        else:
            rows[at].append(g)
            room[at] -= n
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


@dataclass(frozen=True)
class _Layout:
    """One packed row: its ids, position ids, and per position the positions it may attend to (``sees``);
    ``reads[(request, i)]`` is the position whose distribution predicts continuation token i."""

    ids: list[int]
    positions: list[int]
    sees: list[list[int]]
    reads: dict[tuple[int, int], int]


def _layout(groups: Sequence[Group], members: Sequence[int]) -> _Layout:
    """The row of ``groups[members]``: per group its context, then a prefix tree of its options' tokens but the
    last (one position per distinct prefix ``c[:i]``, at position id ``len(context) + i - 1``, seeing the context
    and the prefix's own earlier tokens), so an option's path through the tree is its own row ``x + c``."""
    ids, positions, sees, reads = [], [], [], {}
    for g in members:
        ctx, start = groups[g].context, len(ids)
        context_span = list(range(start, start + len(ctx)))
        for t, token in enumerate(ctx):
            ids.append(token)
            positions.append(t)
            sees.append(context_span[:t + 1])
        node: dict[tuple[int, ...], int] = {}  # option prefix c[:i] -> its position
        for req, cont in groups[g].options:
            reads[(req, 0)] = start + len(ctx) - 1  # the context's last position predicts every first token
            path: list[int] = []
            for i in range(1, len(cont)):
                prefix = cont[:i]
                if prefix not in node:
                    node[prefix] = len(ids)
                    ids.append(cont[i - 1])
                    positions.append(len(ctx) + i - 1)
                    sees.append(context_span + path + [len(ids) - 1])
                path.append(node[prefix])
                reads[(req, i)] = node[prefix]
    return _Layout(ids, positions, sees, reads)


def _packed_inputs(layouts: Sequence[_Layout], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``position_ids`` (B, L) and the bool ``attention_mask`` (B, 1, L, L) of right-padded rows
    (query q may see key j where ``j in sees[q]``; padding sees nothing and is seen by nothing)."""
    width = max(len(r.ids) for r in layouts)
    ids = torch.full((len(layouts), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(layouts), width), dtype=torch.long)
    mask = torch.zeros((len(layouts), 1, width, width), dtype=torch.bool)
    for b, r in enumerate(layouts):
        n = len(r.ids)
        ids[b, :n], positions[b, :n] = torch.tensor(r.ids), torch.tensor(r.positions)
        rows = torch.tensor([q for q, keys in enumerate(r.sees) for _ in keys])
        cols = torch.tensor([k for keys in r.sees for k in keys])
        mask[b, 0, rows, cols] = True
    return {"input_ids": ids, "position_ids": positions, "attention_mask": mask}


@torch.no_grad()
def option_logprobs(model, requests: Sequence[Sequence[Request]], *, batch_size: int, pad_id: int,
                    pack_tokens: int = PACK_TOKENS) -> dict[int, float]:
    """``LL(continuation | context)`` per flat request index (requests already fitted, :func:`fit_requests`),
    every item's shared context run once and items packed into rows (see the module docstring)."""
    if not _accepts(model, "position_ids"):
        raise ValueError(f"{type(model).__name__}.forward takes no position_ids: packed scoring restarts the "
                         "positions in every option segment and needs them")
    device = next(model.parameters()).device
    parts = lm_parts(model)
    groups = build_groups(requests)
    if not groups:
        return {}
    rows = pack(groups, max(pack_tokens, max(g.length for g in groups)))
    out: dict[int, float] = {}
    for start in range(0, len(rows), batch_size):
        layouts = [_layout(groups, members) for members in rows[start:start + batch_size]]
        inputs = {k: v.to(device) for k, v in _packed_inputs(layouts, pad_id).items()}
        # one read per distinct position: a group's context end is read once for all its options
        where = sorted({(b, p) for b, r in enumerate(layouts) for p in r.reads.values()})
        index = {bp: j for j, bp in enumerate(where)}
        rows_idx = torch.tensor([b for b, _ in where], device=device)
        cols_idx = torch.tensor([p for _, p in where], device=device)
        if parts is not None:
            hidden = final_hidden(model, parts[0], **inputs)[rows_idx, cols_idx]                  # (P, H)
            project = parts[1]
        else:
            hidden = model(**inputs).logits[rows_idx, cols_idx]                                   # (P, V)
            project = nn.Identity()
        targets = {}  # read j -> the token ids it must score, with the request each belongs to
        for b, r in enumerate(layouts):
            for (req, i), p in r.reads.items():
                targets.setdefault(index[(b, p)], []).append((req, i))
        conts = {req: cont for g in groups for req, cont in g.options}
        for at in range(0, len(where), HEAD_CHUNK):
            logp = torch.log_softmax(project(hidden[at:at + HEAD_CHUNK]).float(), dim=-1).cpu()  # (chunk, V)
            for j in range(at, min(at + HEAD_CHUNK, len(where))):
                for req, i in targets[j]:
                    out[req] = out.get(req, 0.0) + float(logp[j - at, conts[req][i]])
    return out


def item_logprobs(model, tokenizer, requests: Sequence[Sequence[Request]], *, max_length: int, batch_size: int,
                  name: str = "items") -> list[list[float] | None]:
    """Per item, each option's ``LL`` in option order, or None for an item that does not fit (:func:`fit_requests`);
    the one entry point of held-out scoring (``orchestrator.evaluation.accuracy``)."""
    fitted = fit_requests(tokenizer, requests, max_length, name=name)
    kept = [r for r in fitted if r is not None]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ll = option_logprobs(model, kept, batch_size=batch_size, pad_id=pad_id)
    out, flat = [], 0
    for options in fitted:
        if options is None:
            out.append(None)
            continue
        out.append([ll[flat + k] for k in range(len(options))])
        flat += len(options)
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
