"""dispatch="grouped" (malora.layers.grouped) on the CPU: the padded-bmm implementation, and torch._grouped_mm
where this torch has a CPU kernel for it, against a per-token float64 reference (values and gradients).

Tolerances: float64 layers 1e-10 (the layer-level checks of test_layers), float32 1e-5, bfloat16 within
2e-2 of the largest reference magnitude (bf16 keeps 8 significant bits: 2^-8 = 3.9e-3 per rounding, a few
roundings deep, plus the two-term top-k sum)."""
from __future__ import annotations

import pytest
import torch

from malora import MALoRAConfig, MoLoRAConfig, MoSLDConfig
from malora.layers.grouped import IMPLS, default_impl, grouped_mixture, use_impl
from tests.malora import test_layers as tl

ROUTED = tl.ROUTED_TOPK


def cpu_has_grouped_mm() -> bool:
    """Whether torch._grouped_mm runs on the CPU here (torch 2.13 has a per-group fallback; older ones do not)."""
    try:
        torch._grouped_mm(torch.zeros(8, 8), torch.zeros(1, 8, 8), offs=torch.tensor([8], dtype=torch.int32))
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return True


CPU_IMPLS = ["bmm", pytest.param("grouped_mm", marks=pytest.mark.skipif(
    not cpu_has_grouped_mm(), reason="torch._grouped_mm has no CPU kernel in this torch"))]


# --------------------------------------------------------------------------------------- layer level (float64)
@pytest.mark.parametrize("mode", ["plain", "regularised-train", "regularised-eval"])
@pytest.mark.parametrize("kind", ROUTED)
def test_grouped_layer_matches_per_token_reference(kind, mode):
    tl.test_matches_per_token_reference_values_and_grads(kind, "grouped", mode)


@pytest.mark.parametrize("kind", ROUTED)
def test_grouped_layer_padded_rows(kind):
    tl.test_padded_rows_get_no_delta_no_counts_and_do_not_change_the_loss(kind, "grouped")


@pytest.mark.parametrize("kind", ROUTED)
def test_grouped_layer_idle_experts_get_zero_grad(kind):
    tl.test_every_adapter_param_gets_a_grad_even_for_idle_experts(kind, "grouped")


def test_configs_accept_grouped():
    for cfg in (MoLoRAConfig(dispatch="grouped"), MALoRAConfig(dispatch="grouped"), MoSLDConfig(dispatch="grouped")):
        assert cfg.dispatch == "grouped"


# ---------------------------------------------------------------------------------------- function level
def reference_mixture(u, gates, idx, up, down, rows):
    """delta[t] = sum_j gates[t, j] B_e (D_e u[t]) with e = idx[t, j], token by token; 0 on padded rows."""
    out = []
    for t in range(u.shape[0]):
        delta = u.new_zeros(up.shape[1])
        if rows is None or rows[t]:
            for j in range(idx.shape[1]):
                e = int(idx[t, j])
                h = u[t] if down is None else down[e] @ u[t]
                delta = delta + gates[t, j] * (up[e] @ h)
        out.append(delta)
    return torch.stack(out)


def make_inputs(shared: bool, dims: tuple[int, int, int], dtype, masked: bool, T: int = 29, N: int = 5, k: int = 2):
    """(u, gates, idx, up, down, rows) with expert N-1 idle (no token routed to it)."""
    q, r, m = dims
    g = torch.Generator().manual_seed(0)
    u = torch.randn(T, r if shared else q, generator=g, dtype=torch.float64)
    gates = torch.rand(T, k, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(N - 1, generator=g)[:k] for _ in range(T)])
    up = torch.randn(N, m, r, generator=g, dtype=torch.float64)
    down = None if shared else torch.randn(N, r, q, generator=g, dtype=torch.float64)
    rows = (torch.rand(T, generator=g) > 0.25) if masked else None
    return [u.to(dtype), gates.to(dtype), idx, up.to(dtype), None if down is None else down.to(dtype), rows]


def value_and_grads(fn, u, gates, idx, up, down, rows):
    """fn(...) and the gradients of sum(fn * w) (w a fixed ramp) w.r.t. u, gates, up, down, float64 on the CPU."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (u, gates, up, down)]
    y = fn(leaves[0], leaves[1], idx, leaves[2], leaves[3], rows)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
    (y * w).sum().backward()
    return [y.detach().double().cpu()] + [t.grad.double().cpu() for t in leaves if t is not None]


def check_grouped_mixture(impl: str, dims, shared: bool, masked: bool, dtype, device: str = "cpu", **sizes) -> None:
    """grouped_mixture(impl) on ``device`` against the float64 CPU reference: values, the four gradients, an idle
    expert's exactly-zero dL/dB and, with padded rows, their exactly-zero delta and gate gradient."""
    inputs = make_inputs(shared, dims, dtype, masked, **sizes)
    expected = value_and_grads(reference_mixture, *[t.double() if torch.is_tensor(t) and t.is_floating_point()
                                                    else t for t in inputs])
    on_device = [t.to(device) if torch.is_tensor(t) else t for t in inputs]
    actual = value_and_grads(lambda *a: grouped_mixture(*a, impl=impl), *on_device)
    assert len(actual) == len(expected) == (4 if shared else 5)
    for name, a, e in zip(["delta", "du", "dgates", "dup", "ddown"], actual, expected):
        if dtype == torch.float32:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=f"{impl} {name}")
        else:
            assert (a - e).abs().max() <= 2e-2 * e.abs().max(), f"{impl} {name}"
    idle = actual[3][-1]                                                # dL/dB of expert N-1, which got no token
    assert torch.equal(idle, torch.zeros_like(idle))
    if masked:                                                           # padded rows: no delta, no gate gradient
        rows = inputs[-1]
        assert torch.equal(actual[0][~rows], torch.zeros_like(actual[0][~rows]))
        assert torch.equal(actual[2][~rows], torch.zeros_like(actual[2][~rows]))


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dims", [(12, 3, 10), (16, 8, 24)], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-expert-D", "shared-A"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mixture_matches_reference(impl, dims, shared, masked, dtype):
    check_grouped_mixture(impl, dims, shared, masked, dtype)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_implementations_agree_and_empty_batch(impl):
    u, gates, idx, up, down, rows = make_inputs(False, (12, 3, 10), torch.float32, masked=True)
    with use_impl(impl):
        forced = grouped_mixture(u, gates, idx, up, down, rows)
    torch.testing.assert_close(forced, grouped_mixture(u, gates, idx, up, down, rows, impl=impl), rtol=0, atol=0)
    empty = grouped_mixture(u[:0], gates[:0], idx[:0], up, down, impl=impl)
    assert empty.shape == (0, 10)


def test_default_impl_and_validation():
    u = torch.zeros(2, 8)
    assert default_impl(u) == "bmm" and default_impl(u.bfloat16()) == "bmm"   # the fast kernel is CUDA bf16
    with use_impl("grouped_mm"):
        assert default_impl(u) == "grouped_mm"
    assert default_impl(u) == "bmm"
    assert IMPLS == ("grouped_mm", "bmm")
    with pytest.raises(ValueError, match="unknown grouped implementation 'nope'"):
        with use_impl("nope"):
            pass
    with pytest.raises(ValueError, match="unknown grouped implementation"):
        grouped_mixture(u, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), torch.zeros(1, 3, 8), impl="x")


def test_grouped_mm_groups_start_and_end_on_16_row_blocks(monkeypatch):
    """The buffer handed to _grouped_mm: every group end a multiple of GROUP_ROWS, the last one the buffer's end,
    and each group holding its expert's slots (checked through the gates placed in the buffer)."""
    from malora.layers import grouped

    seen = []

    def spy(h, ends, up, down):
        seen.append((h.shape[0], ends.clone()))
        group = torch.searchsorted(ends, torch.arange(h.shape[0]), right=True)  # (R,) the group of each row
        return group.to(h.dtype)[:, None].expand(-1, up.shape[1])      # E(u) = its group's index
    monkeypatch.setattr(grouped, "_experts_grouped_mm", spy)
    for T, N in [(1, 1), (7, 3), (29, 5), (100, 8)]:
        k = min(2, N)
        g = torch.Generator().manual_seed(T)
        idx = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(T)])
        gates = torch.rand(T, k, generator=g)
        out = grouped_mixture(torch.randn(T, 16), gates, idx, torch.zeros(N, 8, 4), torch.zeros(N, 4, 16),
                              impl="grouped_mm")
        torch.testing.assert_close(out, (gates * idx).sum(1, keepdim=True).expand(T, 8))  # slot e in group e
        R, ends = seen[-1]
        counts = torch.bincount(idx.reshape(-1), minlength=N)
        sizes = torch.diff(ends, prepend=ends.new_zeros(1))
        assert R % grouped.GROUP_ROWS == 0 and int(ends[-1]) == R
        assert bool((ends % grouped.GROUP_ROWS == 0).all()) and bool((sizes >= counts).all())
