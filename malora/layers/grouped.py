"""Grouped top-k dispatch (``dispatch="grouped"``): every expert's matrices applied to its own token-slots by one
grouped GEMM per matrix, instead of one GEMM launch per expert (``sparse``) or every expert on every token
(``dense``). Same sum as :mod:`malora.layers.base`:

    delta(x) = sum_{j < k} gates[:, j] * B_{idx[:, j]} D_{idx[:, j]} u                                     (T, m)

u (T, q) the shared input, D (N, r, q) or None (MoSLD: u already is A x, r = q), B (N, m, r).

Layout. The S = T k token-slots are sorted by expert (stable) and written into a buffer of R rows where expert
e owns the rows ``[start_e, start_e + size_e)``; ``rank`` is a slot's position inside its expert's group. Rows no
slot fills (padding) read token 0's input and carry gate 0, so they add exactly 0 to the output and send 0
gradient to every weight, and every output row is finite. Two implementations fill the buffer differently:

- ``"grouped_mm"``: ``torch._grouped_mm`` over the (R, q) buffer with int32 group ends ``offs``: size_e = the
  count rounded up to GROUP_ROWS, the last group also takes the buffer's tail, R = S + N (GROUP_ROWS - 1) rounded
  up to GROUP_ROWS (known without reading the counts), so every group starts and ends on a GROUP_ROWS boundary.
  On a Hopper/Blackwell GPU in bf16 this is one CUTLASS kernel per matrix and no host sync; elsewhere torch
  falls back to a per-group loop (which reads ``offs`` on the host). The kernel needs 16-byte aligned strides,
  so q, r and m are zero-padded to multiples of ALIGN_COLS where they are not.
- ``"bmm"``: each group padded to C = the largest count (one host sync), the buffer viewed as (N, C, q), two
  ``torch.bmm``; any device and dtype. Costs N C >= S rows (C = S / N under perfectly balanced routing).

``default_impl``: ``"grouped_mm"`` for bf16 tensors on a GPU where ``_grouped_mm`` has its fast kernel, else
``"bmm"``; ``use_impl`` overrides it for a block of code (benchmarks, tests). Padded rows of the batch
(``rows`` False) keep their routed experts with gate 0: delta 0 on them and no gradient to their gates, as the
other paths; unlike ``sparse`` their slots are computed (their cost, not a host sync to drop them).
Autograd runs through ``index_select``/``index_copy``/``index_add`` and ``_grouped_mm``/``bmm`` (torch's own
derivatives; ``_grouped_mm``'s weight gradient is its 2-D x 2-D grouped form).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

IMPLS = ("grouped_mm", "bmm")
GROUP_ROWS = 16      # rows per group rounded up to this for _grouped_mm (torchtitan pads bf16 groups to 8; 16 is safe)
ALIGN_COLS = 8       # _grouped_mm strides must be multiples of 16 bytes: 8 bf16 elements

_forced: str | None = None


def has_fast_grouped_mm(device: torch.device) -> bool:
    """torch._grouped_mm has its CUTLASS kernel on ``device`` (CUDA, compute capability 9.x or 10.x; torch's
    check in ``_grouped_mm_cuda``); elsewhere it loops over the groups after reading the offsets on the host."""
    return (device.type == "cuda" and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(device)[0] in (9, 10))


def default_impl(u: torch.Tensor) -> str:
    """The implementation ``grouped_mixture`` uses for u when none is given or forced: "grouped_mm" where its
    fast kernel runs (bf16 on :func:`has_fast_grouped_mm` devices), else "bmm"."""
    if _forced is not None:
        return _forced
    return "grouped_mm" if u.dtype == torch.bfloat16 and has_fast_grouped_mm(u.device) else "bmm"


@contextmanager
def use_impl(impl: str) -> Iterator[None]:
    """Run every grouped dispatch inside the block with ``impl`` ("grouped_mm" | "bmm")."""
    global _forced
    if impl not in IMPLS:
        raise ValueError(f"unknown grouped implementation {impl!r}; use one of {IMPLS}")
    previous, _forced = _forced, impl
    try:
        yield
    finally:
        _forced = previous


def _pad_dim(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """t with dimension ``dim`` zero-padded at the end to a multiple of ``multiple`` (t itself if it is one)."""
    extra = -t.shape[dim] % multiple
    if extra == 0:
        return t
    return F.pad(t, [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, extra])


def _grouped_linear(h: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of h (R, K) in group e (``offs[e-1]:offs[e]``) times weight[e]^T, weight (N, M, K) -> (R, M)."""
    return torch._grouped_mm(h, weight.transpose(-2, -1), offs=offs)


def _experts_grouped_mm(h: torch.Tensor, ends: torch.Tensor, up: torch.Tensor,
                        down: torch.Tensor | None) -> torch.Tensor:
    """B_e D_e h for the rows h (R, q) of every group e (int64 ends (N,)) -> (R, m), through _grouped_mm."""
    m = up.shape[1]
    offs = ends.to(torch.int32)
    h = _pad_dim(h, 1, ALIGN_COLS)                                          # (R, q8)
    if down is not None:
        down = _pad_dim(_pad_dim(down, 2, ALIGN_COLS), 1, ALIGN_COLS)       # (N, r8, q8), zero rows/columns
        h = _grouped_linear(h, down, offs)                                  # (R, r8)
    up = _pad_dim(_pad_dim(up, 2, ALIGN_COLS), 1, ALIGN_COLS)               # (N, m8, r8)
    y = _grouped_linear(h, up, offs)                                        # (R, m8)
    return y if y.shape[1] == m else y[:, :m]


def _experts_bmm(h: torch.Tensor, num_experts: int, up: torch.Tensor, down: torch.Tensor | None) -> torch.Tensor:
    """B_e D_e h for h (N C, q) holding C rows per expert -> (N C, m), through two torch.bmm."""
    h = h.view(num_experts, -1, h.shape[1])                                # (N, C, q)
    if down is not None:
        h = torch.bmm(h, down.transpose(1, 2))                              # (N, C, r)
    return torch.bmm(h, up.transpose(1, 2)).flatten(0, 1)                  # (N C, m)


def grouped_mixture(u: torch.Tensor, gates: torch.Tensor, idx: torch.Tensor, up: torch.Tensor,
                    down: torch.Tensor | None = None, rows: torch.Tensor | None = None, *,
                    impl: str | None = None) -> torch.Tensor:
    """Grouped top-k dispatch. u (T, q), gates/idx (T, k), up (N, m, r), down (N, r, q) or None,
    rows (T,) bool or None -> (T, m). ``impl``: "grouped_mm" | "bmm" | None (:func:`default_impl`)."""
    impl = impl or default_impl(u)
    if impl not in IMPLS:
        raise ValueError(f"unknown grouped implementation {impl!r}; use one of {IMPLS}")
    T, k = idx.shape
    N, m, _ = up.shape
    if T == 0:
        return u.new_zeros(0, m)
    if rows is not None:
        gates = gates * rows[:, None].to(gates.dtype)                       # (T, k) padded rows weigh 0
    flat = idx.reshape(-1)                                                  # (S,) expert of each token-slot
    order = torch.argsort(flat, stable=True)                                # (S,) slots grouped by expert
    expert = flat[order]                                                    # (S,) sorted experts
    counts = torch.zeros(N, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    rank = torch.arange(flat.numel(), device=flat.device) - (counts.cumsum(0) - counts)[expert]  # (S,)
    if impl == "grouped_mm":
        sizes = (counts + GROUP_ROWS - 1) // GROUP_ROWS * GROUP_ROWS        # (N,) rows per group
        total = -(-(flat.numel() + N * (GROUP_ROWS - 1)) // GROUP_ROWS) * GROUP_ROWS  # >= sizes.sum(), no sync
    else:
        capacity = int(counts.max())                                        # host sync: the bmm's C
        sizes = torch.full_like(counts, capacity)
        total = N * capacity
    ends = sizes.cumsum(0)                                                  # (N,) group ends
    dest = (ends - sizes)[expert] + rank                                    # (S,) buffer row of each slot
    src = torch.zeros(total, dtype=torch.long, device=flat.device).index_copy(0, dest, order // k)  # (R,) token
    gate = gates.new_zeros(total).index_copy(0, dest, gates.reshape(-1)[order])                   # (R,) 0 on padding
    h = u.index_select(0, src)                                              # (R, q)
    if impl == "grouped_mm":
        # the tail joins the last group; new_full is a fill kernel (a Python scalar assigned in place is a
        # host-to-device copy, which synchronises)
        ends = torch.cat([ends[:-1], ends.new_full((1,), total)])
        y = _experts_grouped_mm(h, ends, up, down)                          # (R, m)
    else:
        y = _experts_bmm(h, N, up, down)                                    # (R, m)
    return u.new_zeros(T, m).index_add(0, src, y * gate[:, None])           # (T, m)
