"""Why a task gains or loses in multi-task training: expert specialisation per task and gradient conflict.

**Specialisation.** For one routed layer with E experts and T tasks, ``counts`` (T, E) holds the token-slots each
task's real tokens sent to each expert (top-k routing: k slots per token; dense routing: each token's argmax head;
padding is never counted, :mod:`malora.routing`). Every task weighs the same, whatever its token count (val sets
and item lengths differ between tasks; weighting by tokens would let the task with the longest items set the
answer):

    p(t) = 1 / T'                      over the T' tasks with at least one slot in the layer
    p(e | t) = counts[t, e] / sum_e counts[t, e]
    p(e) = sum_t p(t) p(e | t)
    I(task; expert) = sum_t p(t) sum_e p(e | t) log2(p(e | t) / p(e))        bits, 0 <= I <= H(task) = log2 T'
    H(e | t) / log E                                                         per-task routing entropy in [0, 1]
    max_e p(e)                                                               the largest expert share (collapse)

So routing task A to expert 0 and task B to expert 1 gives I = H(task) = 1 bit and entropy 0 for each task;
every task routing alike gives I = 0. :func:`per_layer_task_expert` gives these per layer;
:func:`task_expert_metrics` averages them over the layers (layers with one expert carry no routing choice and
are left out). :func:`routing_counts_by_task` reads the (T, E) counts from a model and a batch with task ids.

**Gradient conflict.** For each task t, g_t = d L_t / d theta, the gradient of the task's LM loss on a probe
batch over the trainable parameters theta, split into groups (by default the parameter's role, e.g. MALoRA's
shared S_A or the per-expert B, and the layer group: attention or MLP, early or late half of the decoder); per
group G the pairwise cosine

    C_G[s, t] = <g_s|G, g_t|G> / (|g_s|G| |g_t|G|)                           (T, T), NaN where a norm is 0

(exact negatives give -1, identical gradients +1). :func:`gradient_cosines` computes them for any PyTorch model
that returns ``.loss`` from ``model(**batch)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from malora.layers import AdapterLayer, HydraLoRALinear, LoRALinear, MALoRALinear, MoLoRALinear, MoSLDLinear

ATTENTION_NAMES = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "query", "key", "value")
"""Path components that put a module in the attention group; every other adapted module is "mlp"."""

ROLES: dict[type, dict[str, str]] = {
    LoRALinear: {"lora_A": "lora_A", "lora_B": "lora_B"},
    MoLoRALinear: {"lora_A": "expert_A", "lora_B": "expert_B", "lora_router": "router"},
    MALoRALinear: {"lora_S_A": "shared_S_A", "lora_P": "expert_P", "lora_B": "expert_B", "lora_router": "router"},
    MoSLDLinear: {"lora_A": "shared_A", "lora_B": "expert_B", "lora_router": "router"},
    HydraLoRALinear: {"lora_A": "shared_A", "lora_B": "expert_B", "lora_router": "router"},
}
"""Role of each adapter tensor per layer type (keyed by the first component of its name inside the layer)."""


# ------------------------------------------------------------------------------------------ specialisation
def normalised_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) / log E along the last axis of ``p`` (..., E), each row a distribution over E >= 2 experts: 0 when one
    expert takes everything, 1 when all share equally (0 log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    return -plogp.sum(-1) / math.log(p.shape[-1])


def _layer_values(counts: np.ndarray) -> dict[str, object] | None:
    """I, H(task), per-task normalised entropy and the largest share of one (T, E) count matrix; None when the
    layer has one expert or no slot."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"routing counts must be (tasks, experts), got shape {counts.shape}")
    tasks, experts = counts.shape
    totals = counts.sum(1)                                                  # (T,)
    present = totals > 0
    if experts < 2 or not present.any():
        return None
    cond = np.zeros_like(counts)
    cond[present] = counts[present] / totals[present, None]                 # (T, E) p(e | t)
    p_t = present / present.sum()                                           # (T,) equal weights
    p_e = p_t @ cond                                                        # (E,)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(cond > 0, cond / p_e[None, :], 1.0)
        mi = float((p_t[:, None] * cond * np.log2(ratio)).sum())
    entropy = normalised_entropy(cond)                                      # (T,) in [0, 1]
    return {"mi": max(mi, 0.0), "h_task": math.log2(int(present.sum())), "present": present,
            "entropy": entropy, "max_share": float(p_e.max()), "share": cond}


def per_layer_task_expert(counts: Mapping[str, np.ndarray], tasks: list[str]) -> dict[str, dict[str, object]]:
    """Per routed layer (name -> (T, E) counts, rows in ``tasks`` order): ``{"mi": bits, "mi_norm": I / H(task)
    (0 when one task is present), "entropy": {task: H(e|t) / log E}, "max_share": max_e p(e), "share": (T, E)
    p(e | t)}``. Layers with one expert or no slot are left out."""
    out = {}
    for name, matrix in counts.items():
        matrix = np.asarray(matrix)
        if matrix.shape[0] != len(tasks):
            raise ValueError(f"routing counts of {name} have {matrix.shape[0]} rows for {len(tasks)} tasks {tasks}")
        v = _layer_values(matrix)
        if v is None:
            continue
        out[name] = {"mi": v["mi"], "mi_norm": v["mi"] / v["h_task"] if v["h_task"] > 0 else 0.0,
                     "entropy": {t: float(e) for t, e, p in zip(tasks, v["entropy"], v["present"]) if p},
                     "max_share": v["max_share"], "share": v["share"]}
    return out


def task_expert_metrics(counts: Mapping[str, np.ndarray], tasks: list[str]) -> dict[str, float]:
    """Averages over the routed layers of :func:`per_layer_task_expert`: ``routing_mi`` (bits),
    ``routing_mi_norm`` (I / H(task)), ``routing_entropy/<task>`` (normalised per layer, then averaged) and
    ``routing_max_share`` (the largest expert share of the most collapsed layer). Empty without routed layers."""
    layers = per_layer_task_expert(counts, tasks)
    if not layers:
        return {}
    out = {"routing_mi": float(np.mean([v["mi"] for v in layers.values()])),
           "routing_mi_norm": float(np.mean([v["mi_norm"] for v in layers.values()])),
           "routing_max_share": max(v["max_share"] for v in layers.values())}
    for task in tasks:
        values = [v["entropy"][task] for v in layers.values() if task in v["entropy"]]
        if values:
            out[f"routing_entropy/{task}"] = float(np.mean(values))
    return out


def _router_counts(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.lora_router.expert_counts.detach().cpu().clone()
            for name, layer in model.named_modules() if isinstance(layer, AdapterLayer) and hasattr(layer, "lora_router")}


@torch.no_grad()
def routing_counts_by_task(model: nn.Module, batch: Mapping[str, torch.Tensor], task_ids: torch.Tensor,
                           tasks: list[str]) -> dict[str, np.ndarray]:
    """(T, E) token-slot counts per routed layer from one forward per task over ``batch``'s rows of that task.

    ``batch``: the model's keyword inputs, each (B, ...) (``input_ids``, ``attention_mask``; padding is not
    counted); ``task_ids`` (B,) int index into ``tasks``. The routers' running counts are left as they were.
    """
    before = _router_counts(model)
    out = {name: np.zeros((len(tasks), c.numel()), dtype=np.int64) for name, c in before.items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    task_ids = torch.as_tensor(task_ids).cpu()
    for t in range(len(tasks)):
        rows = (task_ids == t).nonzero().flatten()
        if rows.numel() == 0:
            continue
        start = _router_counts(model)
        model(**{k: v[rows.to(v.device)] if torch.is_tensor(v) else v for k, v in inputs.items()})
        for name, c in _router_counts(model).items():
            out[name][t] = (c - start[name]).numpy()
    for name, layer in model.named_modules():            # put back the training run's counts
        if name in before:
            layer.lora_router._counts = before[name].to(layer.lora_router.weight.device)
    return out


# ------------------------------------------------------------------------------------------ gradient conflict
def layer_group(module_path: str, num_layers: int | None) -> str:
    """``attn`` or ``mlp`` by the module path, and ``early`` / ``late`` by the decoder-layer index (first integer
    path component) against ``num_layers``: ``"attn_early"``. Without an index or a layer count: ``"attn"``."""
    parts = module_path.split(".")
    kind = "attn" if any(any(a in p for a in ATTENTION_NAMES) for p in parts) else "mlp"
    index = next((int(p) for p in parts if p.isdigit()), None)
    if index is None or not num_layers:
        return kind
    return f"{kind}_{'early' if index < num_layers / 2 else 'late'}"


def layer_count(names: list[str]) -> int | None:
    """Decoder depth implied by module paths: the largest layer index (first integer component) + 1; None when
    no path has one."""
    indices = [int(m.group(1)) for n in names if (m := re.search(r"\.(\d+)\.", f".{n}."))]
    return max(indices) + 1 if indices else None


def default_groups(model: nn.Module) -> dict[str, str]:
    """Trainable parameter name -> ``"<role>/<layer group>"`` (e.g. ``"shared_S_A/attn_early"``) for every
    adapter tensor of ``model``; roles from :data:`ROLES` (an unknown layer type: the tensor's own name)."""
    layers = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, AdapterLayer)]
    num_layers = layer_count([name for name, _ in layers])
    out = {}
    for path, layer in layers:
        roles = ROLES.get(type(layer), {})
        for pname, param in layer.named_parameters():
            if not param.requires_grad:
                continue
            head = pname.split(".")[0]
            out[f"{path}.{pname}"] = f"{roles.get(head, head)}/{layer_group(path, num_layers)}"
    return out


def cosine_matrix(grads: np.ndarray) -> np.ndarray:
    """(T, T) pairwise cosine of the rows of ``grads`` (T, P), in float64; NaN for a row of norm 0."""
    g = np.asarray(grads, dtype=np.float64)
    norms = np.linalg.norm(g, axis=1)                                      # (T,)
    with np.errstate(divide="ignore", invalid="ignore"):
        unit = g / norms[:, None]
    cos = np.clip(unit @ unit.T, -1.0, 1.0)
    cos[norms == 0, :] = np.nan
    cos[:, norms == 0] = np.nan
    return cos


def gradient_cosines(model: nn.Module, batches_by_task: Mapping[str, Mapping[str, torch.Tensor]],
                     groups: Callable[[str], str | None] | Mapping[str, str] | None = None,
                     loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None
                     ) -> dict[str, np.ndarray]:
    """Per group, the (T, T) cosine of the tasks' gradients (tasks in ``batches_by_task`` order), plus ``"all"``.

    ``batches_by_task``: task -> keyword inputs with ``labels`` (``model(**batch).loss`` is the task's loss unless
    ``loss_fn(model, batch)`` is given). ``groups``: parameter name -> group (None leaves it out), as a callable
    or a mapping; default :func:`default_groups`. Runs in eval mode (no dropout, no DropConnect: the same probe
    gives the same gradient), with ``torch.autograd.grad`` (the parameters' ``.grad`` stay untouched), and puts
    the routers' token counts back as they were. The model's train/eval mode is restored.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if groups is None:
        groups = default_groups(model)
    lookup = groups.get if isinstance(groups, Mapping) else groups
    keyed = [(n, p, lookup(n)) for n, p in named]
    keyed = [(n, p, g) for n, p, g in keyed if g is not None]
    if not keyed:
        raise ValueError("gradient_cosines: no trainable parameter is in a group. Fix: inject adapters, or pass "
                         "groups mapping parameter names to group names.")
    params = [p for _, p, _ in keyed]
    was_training = model.training
    counts = {name: layer.lora_router._counts.clone() for name, layer in model.named_modules()
              if isinstance(layer, AdapterLayer) and hasattr(layer, "lora_router")}
    model.eval()
    flat: dict[str, list[np.ndarray]] = {}
    try:
        for task, batch in batches_by_task.items():
            loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            by_group: dict[str, list[torch.Tensor]] = {}
            for (_, p, g), grad in zip(keyed, grads):
                grad = torch.zeros_like(p) if grad is None else grad
                by_group.setdefault(g, []).append(grad.detach().double().flatten())
            parts = {g: torch.cat(v) for g, v in by_group.items()}
            parts["all"] = torch.cat(list(parts.values()))
            for g, v in parts.items():
                flat.setdefault(g, []).append(v.cpu().numpy())
    finally:
        model.train(was_training)
        for name, layer in model.named_modules():
            if name in counts:
                layer.lora_router._counts = counts[name]
    return {g: cosine_matrix(np.stack(rows)) for g, rows in flat.items()}


def conflict_summary(cos: np.ndarray, tasks: list[str]) -> dict[str, object]:
    """``{"mean": mean off-diagonal cosine, "min": the most negative pair's value, "pair": (task, task)}`` of a
    (T, T) matrix; NaN entries are left out (all NaN or one task: mean and min NaN, pair None)."""
    rows, cols = np.triu_indices(len(tasks), k=1)
    values = cos[rows, cols]
    finite = np.isfinite(values)
    if not finite.any():
        return {"mean": float("nan"), "min": float("nan"), "pair": None}
    i = int(np.flatnonzero(finite)[np.argmin(values[finite])])
    return {"mean": float(values[finite].mean()), "min": float(values[i]), "pair": (tasks[rows[i]], tasks[cols[i]])}
