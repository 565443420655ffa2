"""Adapter configurations: one frozen dataclass per method, validated once on creation.

Every config has a ``kind`` discriminator (``"lora" | "molora" | "malora" | "mosld" | "hydra"``), the target
module names, ``alpha`` (the output scale is ``alpha / rank``) and ``dropout`` (applied to the layer input x
before the down-projection). Routed configs also carry ``dispatch`` (how tokens reach their experts, see
:func:`malora.layers.base.choose_dispatch`).

A violated rule raises :class:`ConfigError` naming the field, the value and the fix. Values are never
silently changed; the only normalisation is list -> tuple for sequence fields (so configs read from JSON or
YAML compare and hash like the ones written in Python).

Paper-level choices that the papers leave open are fields with documented defaults (see METHODS.md §1.9):
``renormalize`` (top-k weights renormalised to sum to 1?), ``balance_coef`` (0.01 in the MALoRA tables vs
0.001 in its text), ``balance_reduction`` (mean or sum over routed modules; the papers never say) and
``k0_is_expert`` (is MALoRA's K_0 expert 0's own matrix or an extra one?).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Union

DISPATCH_MODES = ("auto", "sparse", "dense", "loop", "grouped")
BALANCE_REDUCTIONS = ("mean", "sum")
ROUTED_KINDS = ("molora", "malora", "mosld", "hydra")
MALORA_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """An adapter config, or its use on a model, is invalid. The message names the field, the value and the fix."""


# --------------------------------------------------------------------------------------------- field checks
def _fail(cfg: Any, name: str, value: Any, rule: str, fix: str) -> None:
    raise ConfigError(f"{type(cfg).__name__}.{name}={value!r} is invalid: {rule}. Fix: {fix}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_rank(cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    if not _is_int(value) or value <= 0:
        _fail(cfg, name, value, "must be a positive integer (rank <= 0 or non-integer)", f"set {name} to e.g. 8")


def _check_positive(cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        _fail(cfg, name, value, "must be a finite number > 0", f"set {name} to a positive value")


def _check_probability(cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        _fail(cfg, name, value, "must lie in [0, 1)", f"set {name} to a probability such as 0.05 (0 disables it)")


def _check_nonnegative(cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        _fail(cfg, name, value, "must be a finite number >= 0", f"set {name} to e.g. 0.01 (0 disables it)")


def _check_bool(cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, bool):
        _fail(cfg, name, value, "must be true or false", f"set {name} to a boolean")


class _ConfigMixin:
    """Shared behaviour (not fields) of every adapter config: common checks, serialisation."""

    KIND = ""

    def _normalise_sequences(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    def _check_common(self) -> None:
        if self.kind != self.KIND:
            _fail(self, "kind", self.kind, f"{type(self).__name__} has kind {self.KIND!r}",
                  f"omit kind or use the config class for {self.kind!r}")
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, tuple):
            _fail(self, "target_modules", targets, "must be a tuple of module names",
                  'write e.g. ("q_proj", "v_proj")')
        if not targets:
            _fail(self, "target_modules", targets, "is empty, so nothing would be adapted",
                  'name at least one module, e.g. ("q_proj", "v_proj")')
        for name in targets:
            if not isinstance(name, str) or not name or "." in name:
                _fail(self, "target_modules", targets, f"entry {name!r} is not a final module-name component",
                      'use last components of module paths such as "q_proj" or "c_attn"')
        _check_positive(self, "alpha")
        _check_probability(self, "dropout")
        if hasattr(self, "dispatch") and self.dispatch not in DISPATCH_MODES:
            _fail(self, "dispatch", self.dispatch, f"must be one of {DISPATCH_MODES}", 'use "auto"')

    def _check_routing(self, experts: tuple[int, ...]) -> None:
        if not _is_int(self.top_k) or self.top_k <= 0:
            _fail(self, "top_k", self.top_k, "must be a positive integer", "set top_k to e.g. 2")
        if self.top_k > min(experts):
            _fail(self, "top_k", self.top_k, f"exceeds the number of experts ({min(experts)})",
                  "lower top_k or add experts")
        _check_bool(self, "renormalize")
        _check_nonnegative(self, "balance_coef")
        if self.balance_reduction not in BALANCE_REDUCTIONS:
            _fail(self, "balance_reduction", self.balance_reduction, f"must be one of {BALANCE_REDUCTIONS}",
                  'use "mean" (MixLoRA / MoE-PEFT scale, see malora.inject.collect_aux_loss)')

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists); ``config_from_dict(cfg.to_dict()) == cfg``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def experts_for_layer(self, layer_idx: int | None, num_layers: int | None) -> int:
        """Number of experts of the adapter in decoder layer ``layer_idx`` of a ``num_layers``-layer model."""
        experts = self.num_experts
        if _is_int(experts):
            return experts
        if num_layers is not None and len(experts) != num_layers:
            _fail(self, "num_experts", experts,
                  f"has {len(experts)} per-layer entries but the model has {num_layers} layers",
                  f"give exactly {num_layers} entries (one per layer) or a single integer")
        if layer_idx is None or not 0 <= layer_idx < len(experts):
            _fail(self, "num_experts", experts,
                  f"is per-layer but the module's layer index is {layer_idx!r}",
                  "target only modules inside numbered decoder layers, or give a single integer")
        return experts[layer_idx]


# --------------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class LoRAConfig(_ConfigMixin):
    """LoRA (Hu et al. 2021): ``y = W x + (alpha/r) B A dropout(x)``; A (r, n) Kaiming-uniform, B (m, r) zero."""

    KIND = "lora"
    kind: str = "lora"
    r: int = 8
    """Rank of A (r, n) and B (m, r)."""
    alpha: float = 16.0
    """Output scale is alpha / r (= 2, as in every table of the MALoRA paper)."""
    dropout: float = 0.05
    """Dropout probability on x before A."""
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Final module-name components to adapt (Hu et al. adapt q and v)."""

    def __post_init__(self) -> None:
        self._normalise_sequences("target_modules")
        self._check_common()
        _check_rank(self, "r")


@dataclass(frozen=True)
class MoLoRAConfig(_ConfigMixin):
    """MoLoRA: ``y = W x + (alpha/r) sum_{t in topk} G_t(x) B_t A_t dropout(x)``, ``G = TopK(softmax(W_g x))``.

    Defaults follow the MoLoRA baseline of the MALoRA paper (sparse top-2 of 8, r = 8, balance loss), not
    Zadouri et al.'s dense soft merge.
    """

    KIND = "molora"
    kind: str = "molora"
    r: int = 8
    """Rank of every expert's A_t (r, n) and B_t (m, r)."""
    num_experts: int = 8
    """Number of experts N per adapted linear."""
    top_k: int = 2
    """Experts used per token (1 <= top_k <= num_experts)."""
    renormalize: bool = False
    """Renormalise the top-k probabilities to sum to 1. Not stated by MALoRA; False follows Zadouri et al.'s
    top-k code (mask, no renormalisation), which MALoRA says its routing copies."""
    balance_coef: float = 0.01
    """Weight of the balance loss N * sum_i f_i P_i (Mixtral form, f sums to top_k; see Router). 0.01 = MALoRA
    Tables 8/9 (its text says 0.001), read with MixLoRA's meaning: with ``balance_reduction="mean"``."""
    balance_reduction: str = "mean"
    """How collect_aux_loss combines the routed modules' losses: "mean" (default; the scale of MixLoRA /
    MoE-PEFT / transformers' Mixtral, whose one loss pools every layer, so the papers' 0.01 means the same
    here) or "sum" (0.01 then weighs each module, i.e. 0.01 x the number of routed modules in total)."""
    alpha: float = 16.0
    """Output scale is alpha / r (= 2)."""
    dropout: float = 0.05
    """Dropout probability on x before the experts' A_t (the router sees the clean x)."""
    dispatch: str = "auto"
    """How tokens reach experts: "sparse" (grouped per expert), "dense" (all experts, gate-masked), "loop"
    (per-expert Python loop, the usual implementation, kept as a baseline), "grouped" (one grouped GEMM per
    matrix, malora.layers.grouped) or "auto" (choose_dispatch)."""
    target_modules: tuple[str, ...] = MALORA_TARGETS
    """MALoRA paper's targets: q, k, v, gate, up, down (no o_proj, see METHODS.md §1.4)."""

    def __post_init__(self) -> None:
        self._normalise_sequences("target_modules")
        self._check_common()
        _check_rank(self, "r")
        _check_rank(self, "num_experts")
        self._check_routing((self.num_experts,))


@dataclass(frozen=True)
class MALoRAConfig(_ConfigMixin):
    """MALoRA (arXiv 2410.22782): ``y = W x + (alpha/r_bar) sum_{t in topk} G_t(x) B_t P_t (S_A dropout(x))``.

    S_A (d, n) is shared by the layer's experts; P_t (r_bar, d); B_t (m, r_bar) zero. Use
    :func:`malora_dims` to derive (d, r_bar) from a MoLoRA budget (r, N, lambda).
    """

    KIND = "malora"
    kind: str = "malora"
    d: int = 32
    """Rank of the shared subspace S_A (d, n); paper main setting d = lambda r N = 0.5 * 8 * 8 = 32."""
    r_bar: int = 12
    """Rank of every expert's P_t (r_bar, d) and B_t (m, r_bar); paper r_bar = (2 - lambda) r = 12. Must be <= d
    because P_t is initialised as the first r_bar of the d rows of U_t Sigma_t."""
    beta: float = 1.0
    """Weight balance scale: P_t = (U_t Sigma_t)[:r_bar] / beta, S_A = beta V_0; P_t S_A does not depend on it.
    Paper: 1.0 inter-domain, 1.25 intra-domain."""
    num_experts: int = 8
    """Number of experts N per adapted linear."""
    top_k: int = 2
    """Experts used per token."""
    renormalize: bool = False
    """Renormalise the top-k probabilities. The paper is silent and says its routing follows MoLoRA, whose
    top-k does not renormalise; so False."""
    balance_coef: float = 0.01
    """Balance-loss weight: 0.01 from Tables 8/9 (Section 4.1's text says 0.001); see MoLoRAConfig.balance_coef."""
    balance_reduction: str = "mean"
    """See MoLoRAConfig.balance_reduction."""
    alpha: float = 24.0
    """Output scale is alpha / r_bar (= 24 / 12 = 2, as the paper's tables)."""
    dropout: float = 0.05
    """Dropout probability on x before S_A."""
    k0_is_expert: bool = True
    """Paper draws K_t for "t in [0, N]". True: N matrices, K_0 is expert 0's own and also gives S_A = beta V_0
    (so P_0 S_A = K_0[:r_bar] exactly). False: N + 1 matrices, K_0 only gives S_A, experts use K_1..K_N."""
    dispatch: str = "auto"
    """See MoLoRAConfig.dispatch; experts work on the d-dim z = S_A x, computed once per token."""
    target_modules: tuple[str, ...] = MALORA_TARGETS
    """Paper Tables 8/9: q, k, v, gate, up, down."""

    def __post_init__(self) -> None:
        self._normalise_sequences("target_modules")
        self._check_common()
        _check_rank(self, "d")
        _check_rank(self, "r_bar")
        if self.r_bar > self.d:
            _fail(self, "r_bar", self.r_bar, f"exceeds d ({self.d}); P_t takes r_bar of the d rows of U_t Sigma_t",
                  "lower r_bar or raise d (malora_dims gives consistent pairs)")
        _check_positive(self, "beta")
        _check_rank(self, "num_experts")
        self._check_routing((self.num_experts,))
        _check_bool(self, "k0_is_expert")


@dataclass(frozen=True)
class MoSLDConfig(_ConfigMixin):
    """MoSLD (arXiv 2412.08946): ``y = W x + (alpha/r) sum_{k in topk} S^k(x) B_k A~ dropout(x)``.

    A (r, n) is shared by the layer's experts and gets DropConnect in training: A~ = (mask * A) / (1 - p),
    mask ~ Bernoulli(1 - p), a fresh mask per forward; B_k (m, r) zero.
    """

    KIND = "mosld"
    kind: str = "mosld"
    r: int = 8
    """Rank of the shared A (r, n) and every B_k (m, r)."""
    num_experts: int | tuple[int, ...] = 8
    """Experts per adapted linear: one integer, or one entry per decoder layer (e.g. (2, 2, 4, 4, ...)); the
    list length is checked against the model's layer count at injection."""
    top_k: int = 2
    """Experts used per token (paper K = 2); must not exceed any per-layer count."""
    renormalize: bool = True
    """Paper Eq. 1 renormalises the top-k probabilities."""
    dropconnect: float = 0.1
    """DropConnect probability p on A's weights (paper p = 0.1); training only."""
    balance_coef: float = 0.01
    """Balance-loss weight; MoSLD gives no coefficient, 0.01 matches MALoRA's tables (MoLoRAConfig.balance_coef)."""
    balance_reduction: str = "mean"
    """See MoLoRAConfig.balance_reduction."""
    alpha: float = 16.0
    """Output scale is alpha / r (paper r = 8, alpha = 16)."""
    dropout: float = 0.0
    """Dropout on x; 0 because the paper's regulariser is DropConnect on A."""
    dispatch: str = "auto"
    """See MoLoRAConfig.dispatch."""
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Paper adapts W_q and W_v only."""

    def __post_init__(self) -> None:
        self._normalise_sequences("target_modules", "num_experts")
        self._check_common()
        _check_rank(self, "r")
        experts = self.num_experts
        if isinstance(experts, tuple):
            if not experts or not all(_is_int(e) and e > 0 for e in experts):
                _fail(self, "num_experts", experts, "per-layer list needs positive integer entries",
                      "give one positive integer per decoder layer")
        elif not _is_int(experts) or experts <= 0:
            _fail(self, "num_experts", experts, "must be a positive integer or a per-layer list",
                  "set num_experts to e.g. 8")
        self._check_routing(experts if isinstance(experts, tuple) else (experts,))
        _check_probability(self, "dropconnect")


@dataclass(frozen=True)
class HydraLoRAConfig(_ConfigMixin):
    """HydraLoRA: ``y = W x + (alpha/r) sum_{i=1..N} softmax(W_g x)_i B_i A dropout(x)``.

    One shared A (r, n), N heads B_i (m, r) zero, dense softmax over all heads, no top-k, no balance loss.
    """

    KIND = "hydra"
    kind: str = "hydra"
    r: int = 8
    """Rank of the shared A (r, n) and every head B_i (m, r)."""
    num_experts: int = 4
    """Number of B heads (HydraLoRA example script: 4)."""
    alpha: float = 16.0
    """Output scale is alpha / r (= 2)."""
    dropout: float = 0.05
    """Dropout on x before A."""
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    """HydraLoRA's example script adapts the FFN projections."""

    def __post_init__(self) -> None:
        self._normalise_sequences("target_modules")
        self._check_common()
        _check_rank(self, "r")
        _check_rank(self, "num_experts")


AdapterConfig = Union[LoRAConfig, MoLoRAConfig, MALoRAConfig, MoSLDConfig, HydraLoRAConfig]
CONFIG_CLASSES: dict[str, type] = {
    c.KIND: c for c in (LoRAConfig, MoLoRAConfig, MALoRAConfig, MoSLDConfig, HydraLoRAConfig)
}


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """Build the config named by ``d["kind"]``; unknown kinds or keys raise ConfigError listing the valid ones.

    Lists are accepted where tuples are expected (JSON/YAML input).
    """
    if not isinstance(d, dict):
        raise ConfigError(f"adapter config must be a dict, got {type(d).__name__}")
    kind = d.get("kind")
    if kind not in CONFIG_CLASSES:
        raise ConfigError(f"adapter config kind={kind!r} is unknown. Fix: use one of {sorted(CONFIG_CLASSES)}.")
    cls = CONFIG_CLASSES[kind]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}. Fix: use only the valid keys {valid}.")
    return cls(**d)


def malora_dims(r: int, num_experts: int, lam: float) -> tuple[int, int]:
    """MALoRA's asymmetric ranks for a MoLoRA budget (METHODS.md §1.2): ``d = lam r N``, ``r_bar = (2 - lam) r``.

    Example: ``malora_dims(8, 8, 0.5) == (32, 12)``. Both must come out as positive integers.
    """
    if not _is_int(r) or r <= 0 or not _is_int(num_experts) or num_experts <= 0:
        raise ConfigError(f"malora_dims(r={r!r}, num_experts={num_experts!r}): both must be positive integers.")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam < 2:
        raise ConfigError(f"malora_dims lam={lam!r} is invalid: must lie in (0, 2) (paper uses lam < 1). "
                          "Fix: use e.g. lam=0.5.")
    d, r_bar = lam * r * num_experts, (2 - lam) * r
    if abs(d - round(d)) > 1e-9 or abs(r_bar - round(r_bar)) > 1e-9 or round(d) < 1 or round(r_bar) < 1:
        raise ConfigError(f"malora_dims(r={r}, num_experts={num_experts}, lam={lam}) gives d={d}, r_bar={r_bar}, "
                          "which are not positive integers. "
                          "Fix: choose lam so that lam*r*N and (2-lam)*r are integers.")
    return int(round(d)), int(round(r_bar))
