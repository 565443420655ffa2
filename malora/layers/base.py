"""Shared pieces of every adapter layer: the wrapper base class and the expert-mixture dispatch paths.

Notation (METHODS.md §3): a frozen linear W (out m, in n); T tokens; N experts; top-k routing. A routed layer
first maps x (T, n) to a shared input u (T, q) (u = x for MoLoRA, S_A x for MALoRA, A x for MoSLD/HydraLoRA),
then mixes per-expert maps ``E_t(u) = B_t D_t u`` (D_t (N, r, q) is absent for MoSLD/HydraLoRA, where r = q):

    delta(x) = sum_{j < k} gates[:, j] * E_{idx[:, j]}(u)                                           (T, m)

Four exact implementations of that sum, chosen per layer by ``dispatch`` (or ``choose_dispatch`` for "auto"):
- ``sparse_mixture``: token-slots sorted by expert, one matmul pair per expert on its tokens only, scatter-add.
- ``dense_mixture``: every expert on every token in two wide matmuls, masked by the (T, N) gate matrix.
- ``loop_mixture``: the usual per-expert Python loop with a boolean mask per expert (benchmark baseline).
- ``grouped_mixture`` (:mod:`malora.layers.grouped`): slots sorted by expert, one grouped GEMM per matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from malora.layers.dropout import InputDropout
from malora.layers.fused import FrozenRouterDown
from malora.layers.grouped import grouped_mixture
from malora.layers.router import RouterOutput
from malora.deferred_aux import AuxGradBox, attach_aux
from malora.routing import NO_CONTEXT, SAVED_MASKS, RoutingContext, refuse_replica, row_state

try:  # GPT-2 style linear: weight (in, out), y = x @ W + b
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency; keep the library importable without it
    Conv1D = None

FUSABLE_BASES = (nn.Linear,) if Conv1D is None else (nn.Linear, Conv1D)  # exact types: no subclass forwards

# choose_dispatch thresholds (benchmarks/adapter_speed.py, benchmarks/probes/dispatch_threshold.py; see choose_dispatch)
DENSE_MAX_COST_RATIO = 1.0
MIN_SLOTS_PER_EXPERT = 128


class LowRank(NamedTuple):
    """A delta held as its two factors, ``delta = h up^T``: h (T, R) with the scaling and any gates folded in,
    up (m, R). The layer adds it to the frozen output with one GEMM that accumulates into that output
    (``y.addmm_(h, up^T)``, BLAS beta = 1) instead of writing a fresh (T, m) delta and adding it in a second
    pass. On a bf16 AMX core a (T, m) add right after the frozen GEMM is memory-bound and costs more than the
    GEMM itself (SmolLM2's MLP up, T = 1600: 2.2 ms frozen GEMM, 3.0 ms up-projection + add, 0.6 ms as one
    ``addmm_``; benchmarks/README.md)."""

    h: torch.Tensor
    up: torch.Tensor


Delta = torch.Tensor | LowRank    # a (T, m) delta, or its factors


def materialise(delta: Delta) -> torch.Tensor:
    """The (T, m) tensor of a :data:`Delta`."""
    return F.linear(delta.h, delta.up) if isinstance(delta, LowRank) else delta


def add_delta_(y: torch.Tensor, delta: Delta) -> torch.Tensor:
    """``y += delta`` in place for y (T, m); a :class:`LowRank` delta as one GEMM into y. Autograd-safe where
    nothing else holds y (a linear's backward never reads its own output); beta = 1, so the backward hands y's
    gradient through untouched."""
    if isinstance(delta, LowRank):
        return y.addmm_(delta.h.to(y.dtype), delta.up.to(y.dtype).T)
    return y.add_(delta.to(y.dtype))


def plain_call(module: nn.Module) -> bool:
    """True when calling ``module`` runs only its class ``forward``: no forward/backward hooks of its own or
    global ones, no per-instance ``forward`` (accelerate's offload hooks replace it), no ``_hf_hook``."""
    hooks = nn.modules.module
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__ or hasattr(module, "_hf_hook")
                or hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks)


def base_dims(base: nn.Module) -> tuple[int, int]:
    """(in_features n, out_features m) of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if Conv1D is not None and isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]  # Conv1D weight is (in, out)
    raise TypeError(f"can only adapt nn.Linear or transformers Conv1D, got {type(base).__name__}")


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """Adapter parameters are float32 (float64 with a float64 base) even on a bf16/fp16 base, as PEFT does:
    low-precision optimiser updates of tiny adapters are lossy. The forward casts them to x.dtype."""
    dtype = base.weight.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class AdapterLayer(nn.Module):
    """Drop-in replacement for a frozen linear: ``forward(x) = base(x) + delta(x)``, delta already scaled.

    Subclasses define ``delta(x, rows)`` for x (T, n) -> (T, m), ``scaling`` times the adapter's low-rank update,
    computed in x.dtype. The scaling is applied where the tensor is smallest (the (T, r) low-rank activations or
    the (T, k) gates), never to a (T, m) one: ``base(x) + scaling * delta`` costs a pass over (T, m) in forward
    and another in backward (``alpha * grad``), ~10 % of a SmolLM2 layer's adapter cost. ``rows`` (T,) bool marks
    the real (non-padding) tokens, or is None when all are real (see :mod:`malora.routing`); routed layers
    give padded rows a zero delta and exclude them from routing counts and the balance loss. Every trainable
    tensor's name starts with ``lora_``. Routed layers (``ROUTED``) set ``last_aux_loss`` on each forward.
    """

    ROUTED = False

    def __init__(self, base: nn.Module, *, scaling: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base_dims(base)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.scaling = scaling
        self.dropout = InputDropout(dropout) if dropout > 0 else nn.Identity()
        self.last_aux_loss: torch.Tensor | None = None
        self.routing_context: RoutingContext | None = None   # set by inject_adapters; not a module
        self.aux_box = AuxGradBox()                           # of last_aux_loss
        self.aux_boxes: dict[int, AuxGradBox] = {}            # generation -> box of a deferred loss (see forward)
        self._state = NO_CONTEXT
        self._aux_now: torch.Tensor | None = None
        self.aux_deferred = False
        self.fused_input = True

    def __getstate__(self) -> dict:
        """Copies and pickles drop the last forward's balance loss (a graph node, which cannot be deep-copied)."""
        state = dict(self.__dict__)
        state.update(last_aux_loss=None, _aux_now=None, aux_box=AuxGradBox(), aux_boxes={}, aux_deferred=False)
        return state

    def _new(self, *shape: int) -> torch.Tensor:
        """Uninitialised adapter tensor on the base's device, in :func:`adapter_dtype`."""
        return torch.empty(*shape, device=self.base.weight.device, dtype=adapter_dtype(self.base))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable adapter tensors, by name relative to this layer."""
        return {n: p for n, p in self.named_parameters() if n.split(".")[0].startswith("lora_")}

    def down_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        """D (q, n) in ``dtype`` that the layer applies to dropout(x) first (LoRA's A, MALoRA's S_A), or None
        for a layer that uses x otherwise (MoLoRA). Layers with a D define :meth:`delta_from`."""
        return None

    def delta_from(self, x: torch.Tensor, z: torch.Tensor, rows: torch.Tensor | None,
                   logits: torch.Tensor | None) -> Delta:
        """delta (T, m), or its :class:`LowRank` factors, from x (T, n), z = D dropout(x) (T, q) and, where
        already computed, the router's logits (T, N)."""
        raise NotImplementedError

    def delta(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> Delta:
        z = self.dropout(x)                                         # drawn before D: MoSLD's D draws too
        return self.delta_from(x, F.linear(z, self.down_weight(x.dtype)), rows, None)

    def route(self, x: torch.Tensor, rows: torch.Tensor | None,
              logits: torch.Tensor | None = None) -> RouterOutput:
        """Run ``lora_router`` on x (T, n): counts tokens unless this call is a checkpoint recomputation."""
        route = self.lora_router(x, rows, count=not self._state.recompute, logits=logits)
        self._aux_now = route.aux_loss
        return route

    def fused_input_applies(self, x: torch.Tensor) -> bool:
        """Whether this forward takes the fused input (:mod:`malora.layers.fused`: frozen matmul, router and D in
        one node): on CPU with autograd on and autocast off (the node's backward runs its GEMMs in the forward's
        dtypes), around a frozen ``nn.Linear``/``Conv1D`` of exactly that type whose call would run nothing but
        its class ``forward`` (:func:`plain_call`: the node reads the weight and never calls the base), for
        layers with a D; not while ``torch.compile`` traces it (the node's drop positions read a tensor on the host,
        and the compiler fuses the separate ops itself). ``fused_input = False`` on a layer keeps the separate ops
        (the reference path)."""
        base = self.base
        return (self.fused_input and x.device.type == "cpu" and torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
                and type(base) in FUSABLE_BASES and plain_call(base) and not base.weight.requires_grad
                and (base.bias is None or not base.bias.requires_grad)
                and type(self).down_weight is not AdapterLayer.down_weight)

    def fused_input_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(base(x) (T, m), router logits (T, N) or None, z (T, q)) of x (T, n) through FrozenRouterDown."""
        positions = self.dropout.positions(x) if isinstance(self.dropout, InputDropout) else None
        down = self.down_weight(x.dtype)                            # drawn after the positions, as in delta()
        if positions is not None:
            down = down * (1.0 / (1.0 - self.dropout.p))            # s on the small D, not on (T, n)
        base = self.base
        weight = base.weight.T if Conv1D is not None and isinstance(base, Conv1D) else base.weight  # (m, n)
        router = getattr(self, "lora_router", None)
        return FrozenRouterDown.apply(x, weight, base.bias, None if router is None else router.weight.to(x.dtype),
                                      down, positions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        refuse_replica(self)
        self._state = state = row_state(self.routing_context, x.shape) if self.ROUTED else NO_CONTEXT
        self._aux_now = None
        x2 = x.reshape(-1, self.in_features)                        # (T, n)
        # Accumulate in place where nothing else holds the base's output (add_delta_): no output-sized sum per
        # adapted layer and step, and a low-rank delta goes straight into y as one GEMM.
        shape = (*x.shape[:-1], self.out_features)
        if self.fused_input_applies(x2):
            y, logits, z = self.fused_input_forward(x2)             # (T, m), (T, N) or None, (T, q)
            # add before the view: in place on a view of the node's output would make autograd copy the
            # (T, m) gradient in and out (CopySlices) on every backward
            y = add_delta_(y, self.delta_from(x2, z, state.rows, logits)).view(shape)
        elif plain_call(self.base):
            y = add_delta_(self.base(x2), self.delta(x2, state.rows)).view(shape)
        else:  # a hook (or a replaced forward) on the base may keep y or expect x's shape: never change y under it
            y = self.base(x)                                        # (..., m)
            y = y + materialise(self.delta(x2, state.rows)).view(y.shape).to(y.dtype)
        if not self.ROUTED:
            return y
        aux, self._aux_now = self._aux_now, None
        if state.recompute:                                         # checkpoint: keep the first forward's loss
            box = self.aux_boxes.get(state.generation)              # that forward's, whatever ran since
            return y if box is None else attach_aux(y, aux, box)
        if any(box.grad is not None for box in self.aux_boxes.values()):
            raise RuntimeError(
                "malora: the balance-loss gradient of the last backward never reached the routers: with reentrant "
                "gradient checkpointing it flows through the recomputation that the LM loss triggers. Fix: call "
                "(lm_loss + collect_aux_loss(model)).backward() in one call, or use use_reentrant=False.")
        self.last_aux_loss, self.aux_deferred = aux, state.defer_aux and aux is not None
        self.aux_box = AuxGradBox()
        if self.aux_deferred:  # kept for the recomputation of this forward, even if others run before backward
            self.aux_boxes[state.generation] = self.aux_box
            while len(self.aux_boxes) > SAVED_MASKS:
                del self.aux_boxes[next(iter(self.aux_boxes))]
        return y


# ------------------------------------------------------------------------------------------------- dispatch
def choose_dispatch(num_tokens: int, num_experts: int, top_k: int, expert_macs: int, base_macs: int) -> str:
    """Pick "dense" or "sparse" for ``dispatch="auto"``.

    ``expert_macs``: multiply-adds per token of one expert's own matrices (MoLoRA r(n+m), MALoRA r_bar(d+m),
    MoSLD r m); ``base_macs``: the frozen matmul's n m. Rule:
    - "dense" when running every expert on every token costs at most DENSE_MAX_COST_RATIO (1) of the frozen
      matmul (the papers' shapes: MoLoRA 8 x r8 or MALoRA (12, 32) on 4096-wide layers are ~3%; SmolLM2's
      576 -> 192 k/v projections put MoLoRA 8 x r8 at 0.44): two wide GEMMs beat the sort, gather, N small GEMMs
      and scatter of the sparse path. At 1/4 those k/v layers went sparse and MoLoRA trained 1.75x slower on a
      bf16 Xeon (benchmarks/README.md); on an H200 the grouped sparse path was 1.3-2.3x slower than dense;
    - "dense" when experts would get fewer than MIN_SLOTS_PER_EXPERT token-slots on average (launch-bound);
    - "sparse" otherwise (many experts or wide experts relative to the layer, enough tokens).
    """
    if num_experts * expert_macs <= DENSE_MAX_COST_RATIO * base_macs:
        return "dense"
    if num_tokens * top_k < MIN_SLOTS_PER_EXPERT * num_experts:
        return "dense"
    return "sparse"


def _expert(u: torch.Tensor, e: int, up: torch.Tensor, down: torch.Tensor | None) -> torch.Tensor:
    """E_e(u) = B_e (D_e u) for the rows u (T_e, q) -> (T_e, m)."""
    h = u if down is None else F.linear(u, down[e])               # (T_e, r)
    return F.linear(h, up[e])                                       # (T_e, m)


def sparse_mixture(u: torch.Tensor, gates: torch.Tensor, idx: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped top-k dispatch. u (T, q), gates/idx (T, k), up (N, m, r), down (N, r, q) or None -> (T, m).

    Padded token-slots (``rows`` False) go to a sentinel expert N that is never run; one host sync (the
    per-expert slot counts that size the groups).
    """
    T, k = idx.shape
    N = up.shape[0]
    if rows is not None:
        idx = idx.masked_fill(~rows[:, None], N)                    # (T, k) padded slots -> sentinel N
    flat = idx.reshape(-1)                                          # (T*k,) expert of each token-slot
    order = torch.argsort(flat, stable=True)                        # (T*k,) slots grouped by expert
    counts = flat.new_zeros(N + 1).scatter_add_(0, flat, torch.ones_like(flat)).tolist()  # N+1 ints (host sync)
    real = sum(counts[:N])
    order = order[:real]                                            # (S,) real slots, sentinel dropped
    token = order // k                                              # (S,) token of each sorted slot
    u_sorted = u.index_select(0, token)                             # (S, q)
    outs = [_expert(chunk, e, up, down)                             # (T_e, m) each
            for e, chunk in enumerate(u_sorted.split(counts[:N])) if counts[e]]
    if not outs:  # no tokens
        return u.new_zeros(T, up.shape[1])
    out = torch.cat(outs) * gates.reshape(-1)[order, None]          # (S, m)
    return u.new_zeros(T, up.shape[1]).index_add(0, token, out)     # (T, m)


def dense_mixture(u: torch.Tensor, gate_matrix: torch.Tensor,
                  up: torch.Tensor, down: torch.Tensor | None = None) -> LowRank:
    """All experts on all tokens, weighted by gate_matrix (T, N) (zeros for unselected experts) -> the
    :class:`LowRank` factors of the (T, m) delta.

    Cost per token N r (q + m) MACs as two wide GEMMs: ``h = u D_cat^T`` (T, N r), then the gates are folded
    into h so that B is applied once as (T, N r) @ (N r, m), by the layer into its output. No host sync.
    """
    N, m, r = up.shape
    T = u.shape[0]
    if down is None:
        h = u.unsqueeze(1).expand(T, N, r)                          # (T, N, r) shared input for every expert
    else:
        h = F.linear(u, down.reshape(N * r, -1)).view(T, N, r)      # (T, N, r)
    h = (h * gate_matrix.unsqueeze(-1)).reshape(T, N * r)           # (T, N*r) gates folded in
    up_cat = up.permute(1, 0, 2).reshape(m, N * r)                  # (m, N*r)
    return LowRank(h, up_cat)                                       # delta = h up_cat^T (T, m)


def loop_mixture(u: torch.Tensor, gates: torch.Tensor, idx: torch.Tensor, up: torch.Tensor,
                 down: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The per-expert loop as usually written: for each expert, mask its tokens, run its matrices, add back."""
    if rows is not None:
        idx = idx.masked_fill(~rows[:, None], up.shape[0])          # padded slots match no expert
    out = u.new_zeros(u.shape[0], up.shape[1])                      # (T, m)
    for e in range(up.shape[0]):
        token, slot = torch.where(idx == e)                         # (T_e,), (T_e,)
        if token.numel() == 0:
            continue
        y = _expert(u[token], e, up, down) * gates[token, slot, None]  # (T_e, m)
        out = out.index_add(0, token, y)
    return out


def gate_matrix(gates: torch.Tensor, idx: torch.Tensor, num_experts: int,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """Scatter top-k gates (T, k) at idx (T, k) into a (T, N) matrix with zeros elsewhere (and on padded rows)."""
    if rows is not None:
        gates = gates * rows[:, None].to(gates.dtype)               # (T, k) padded rows weigh 0
    return gates.new_zeros(gates.shape[0], num_experts).scatter(1, idx, gates)


def mixture(mode: str, u: torch.Tensor, gates: torch.Tensor, idx: torch.Tensor, up: torch.Tensor,
            down: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> Delta:
    """Run one of the exact dispatch paths ("sparse" | "dense" | "loop" | "grouped") on top-k routing output:
    the (T, m) delta, or for "dense" its :class:`LowRank` factors.

    ``rows`` (T,) bool: padded rows (False) get a zero delta (the sparse and loop paths skip them).
    """
    if mode == "sparse":
        return sparse_mixture(u, gates, idx, up, down, rows)
    if mode == "dense":
        return dense_mixture(u, gate_matrix(gates, idx, up.shape[0], rows), up, down)
    if mode == "loop":
        return loop_mixture(u, gates, idx, up, down, rows)
    if mode == "grouped":  # one grouped GEMM per matrix: malora.layers.grouped
        return grouped_mixture(u, gates, idx, up, down, rows)
    raise ValueError(f"unknown dispatch mode {mode!r}")
