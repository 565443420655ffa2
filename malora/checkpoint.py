"""Adapter checkpoints: adapter-only safetensors + a JSON config with a format version; export to PEFT.

A checkpoint directory holds two files:

- ``adapter_config.json``::

      {"format_version": 1, "library": "malora", "config": cfg.to_dict(), "base_model": "<name or null>",
       "layers": ["model.layers.0.self_attn.q_proj", ...]}

- ``adapter_model.safetensors``: every adapter tensor (each path component after the adapted module starts
  with ``lora_``), keyed by module path + parameter name, e.g. ``model.layers.0.self_attn.q_proj.lora_S_A``.
  Frozen adapter tensors are saved too. A tensor shared by a layer's experts (MALoRA's ``lora_S_A``, the shared
  ``lora_A`` of MoSLD/HydraLoRA) is one parameter with one key, so it is stored exactly once per layer.

Both files are written atomically (temporary file + ``os.replace``). Loading is strict by default: the error
lists missing keys, unexpected keys and shape mismatches. No pickle is involved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from malora.config import AdapterConfig, ConfigError, config_from_dict
from malora.inject import adapter_context, adapter_layers, inject_adapters, remove_adapters
from malora.layers import LoRALinear

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read, or does not fit the model. The message names the path and fix."""


# ------------------------------------------------------------------------------------------------ state dict
def _is_adapter_key(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter parameter of ``model`` by full name, each tensor once (trainable or frozen).

    Raises CheckpointError if two adapter names view the same storage (a shared tensor with several owners
    would be saved several times; our layers give every shared tensor one owner).
    """
    state: dict[str, torch.Tensor] = {}
    owners: dict[tuple[str, int, int], str] = {}
    for name, param in model.named_parameters():  # yields a Parameter reachable under two names once
        if not _is_adapter_key(name):
            continue
        if param.device.type != "meta" and param.numel():
            key = (param.device.type, param.untyped_storage().data_ptr(), param.storage_offset())
            if key in owners:
                raise CheckpointError(f"adapter tensors {owners[key]!r} and {name!r} share storage; a shared "
                                      "tensor must have one owner so it is saved once. Fix the layer code.")
            owners[key] = name
        state[name] = param.detach()
    return state


# --------------------------------------------------------------------------------------------------- writing
def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same directory, then ``os.replace`` (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n"))


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    for name, t in tensors.items():
        if t.device.type == "meta":
            raise CheckpointError(f"adapter tensor {name!r} is on the meta device and has no values to save. "
                                  "Fix: materialise the model (e.g. model.to_empty(device='cpu')) and load weights.")
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def _base_model_name(model: nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def save_adapter(model: nn.Module, cfg: AdapterConfig, out_dir: str | os.PathLike,
                 *, base_model: str | None = None) -> Path:
    """Write ``cfg`` and ``model``'s adapter tensors to ``out_dir`` (created if needed); returns the directory.

    ``base_model`` defaults to the model's ``name_or_path`` (None for config-built models).
    """
    layers = [name for name, _ in adapter_layers(model)]
    if not layers:
        raise CheckpointError("save_adapter: the model has no adapter layers. Fix: call "
                              "malora.inject_adapters(model, cfg) (or load_adapter) before saving.")
    diffs = _config_differences(model, cfg)
    if diffs:
        raise CheckpointError(f"save_adapter: cfg does not describe the model's adapters ({'; '.join(diffs)}). "
                              "Fix: pass the config the adapters were injected with.")
    state = adapter_state_dict(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_tensors(out / WEIGHTS_NAME, state, {"format": "pt", "malora_format_version": str(FORMAT_VERSION)})
    _write_json(out / CONFIG_NAME, {
        "format_version": FORMAT_VERSION,
        "library": "malora",
        "config": cfg.to_dict(),
        "base_model": base_model or _base_model_name(model),
        "layers": layers,
    })
    log.info("saved %d adapter tensors (%d layers) to %s", len(state), len(layers), out)
    return out


# --------------------------------------------------------------------------------------------------- reading
def read_adapter_config(in_dir: str | os.PathLike) -> tuple[AdapterConfig, dict[str, Any]]:
    """Parse and validate ``in_dir/adapter_config.json``; returns (config, the whole JSON payload)."""
    path = Path(in_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. Fix: point to a directory written by "
                                f"malora.save_adapter (it holds {CONFIG_NAME} and {WEIGHTS_NAME}).")
    try:
        payload = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}). Fix: re-save the adapter with "
                              "malora.save_adapter.") from err
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path} has no 'format_version': it is not a malora adapter config (a PEFT "
                              "adapter? load those with peft.PeftModel.from_pretrained). Fix: use a directory "
                              "written by malora.save_adapter.")
    version = payload["format_version"]
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version={version!r} is not supported (this malora reads "
                              f"version {FORMAT_VERSION}). Fix: load it with the malora release that wrote it.")
    for key, kind in (("config", dict), ("layers", list)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"{path}: field {key!r} is missing or not a {kind.__name__}. "
                                  "Fix: re-save the adapter with malora.save_adapter.")
    try:
        cfg = config_from_dict(payload["config"])
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return cfg, payload


def _read_tensors(in_dir: Path) -> dict[str, torch.Tensor]:
    path = in_dir / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. Fix: copy the adapter weights next to {CONFIG_NAME} "
                                "or re-save the adapter with malora.save_adapter.")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); it may be truncated or "
                              "corrupt. Fix: re-save the adapter with malora.save_adapter.") from err


def _problems(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(expected) & set(loaded) if loaded[k].shape != expected[k].shape)
    return missing, unexpected, mismatched


def _format_problems(path: Path, missing: list, unexpected: list, mismatched: list) -> str:
    lines = [f"adapter weights in {path} do not match the model:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            shown = items[:20] + ([f"... ({len(items) - 20} more)"] if len(items) > 20 else [])
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
    lines.append("Fix: load into the same base architecture the adapter was trained on, or re-save it.")
    return "\n".join(lines)


def _config_differences(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Every field in which ``cfg`` differs from the config ``model``'s adapters were injected with.

    Compares the dataclasses field by field (kind, ranks, experts, top_k, renormalize, balance_coef,
    balance_reduction, k0_is_expert, beta, alpha, dropout, dropconnect, dispatch, target_modules, ...), so the
    type of the wrapped base (e.g. a quantised ``nn.Linear`` subclass) plays no part.
    """
    ctx = adapter_context(model)
    if ctx is None:
        return ["the model's adapters were not injected by malora.inject_adapters (no recorded config)"]
    injected = ctx.config
    if type(injected) is not type(cfg):
        return [f"kind: model has {injected.kind!r}, given {cfg.kind!r}"]
    return [f"{f.name}: model has {getattr(injected, f.name)!r}, given {getattr(cfg, f.name)!r}"
            for f in dataclasses.fields(cfg) if getattr(injected, f.name) != getattr(cfg, f.name)]


def load_adapter(model: nn.Module, in_dir: str | os.PathLike, *, strict: bool = True) -> AdapterConfig:
    """Inject the adapter saved in ``in_dir`` into the base ``model`` and load its tensors; returns its config.

    Strict (default): any missing key, unexpected key or shape mismatch raises CheckpointError listing them.
    ``strict=False`` loads the keys that match and logs the rest (shape mismatches always raise). Atomic: on
    any error (bad files, a config that fails to inject, mismatched tensors) the model is left as it was, so
    the call can be retried. A model that already has adapters is accepted only if their recorded config
    equals the checkpoint's in every field and they cover the same layers; their weights are then overwritten.
    Otherwise CheckpointError.
    """
    in_dir = Path(in_dir)
    cfg, payload = read_adapter_config(in_dir)
    loaded = _read_tensors(in_dir)
    weights_path = in_dir / WEIGHTS_NAME
    existing = [name for name, _ in adapter_layers(model)]
    injected: list[str] = []
    if existing:
        expected = adapter_state_dict(model)
        diffs = _config_differences(model, cfg)
        if sorted(existing) != sorted(payload["layers"]):
            diffs.insert(0, f"adapted layers differ: model {len(existing)}, checkpoint {len(payload['layers'])}")
        if diffs or any(_problems(expected, loaded)):
            detail = "; ".join(diffs) or "tensor names or shapes differ"
            raise CheckpointError(
                f"the model already has adapters with a different config than the checkpoint in {in_dir} "
                f"({detail}). Fix: load into a fresh base model without adapters.")
    else:
        injected = inject_adapters(model, cfg)                         # atomic itself
        expected = adapter_state_dict(model)
        missing, unexpected, mismatched = _problems(expected, loaded)
        if mismatched or (strict and (missing or unexpected)):
            remove_adapters(model)
            raise CheckpointError(_format_problems(weights_path, missing, unexpected, mismatched))
        if missing or unexpected:
            log.warning("non-strict load: %s", _format_problems(weights_path, missing, unexpected, []))
    try:
        with torch.no_grad():
            for name, tensor in loaded.items():
                if name in expected:
                    expected[name].copy_(tensor)
    except BaseException:
        if injected:  # a fresh injection is undone; existing adapters may hold a partial copy
            remove_adapters(model)
        raise
    log.info("loaded %d adapter tensors from %s", len(loaded), in_dir)
    return cfg


# ------------------------------------------------------------------------------------------------------ PEFT
def export_peft(model: nn.Module, cfg: AdapterConfig | None = None, out_dir: str | os.PathLike | None = None,
                *, base_model: str | None = None) -> Path:
    """Write a kind-"lora" adapter in PEFT's format, loadable with ``peft.PeftModel.from_pretrained``.

    Keys ``base_model.model.<module path>.lora_A.weight`` (r, n) and ``.lora_B.weight`` (m, r); config with
    ``peft_type="LORA"``, ``r``, ``lora_alpha`` (PEFT's scale is lora_alpha / r, as ours), ``lora_dropout``,
    ``target_modules`` (the adapted modules' last name components) and ``fan_in_fan_out`` for GPT-2 Conv1D.
    ``cfg`` defaults to the config the model was injected with; a given ``cfg`` must equal it in every field
    (r, alpha, dropout, target_modules, ...). Every refusal (a non-LoRA config or model, a config that differs
    from the injected one, no adapters) is one ConfigError listing all the problems. peft itself is not
    needed to export.
    """
    if out_dir is None:
        raise TypeError("export_peft: out_dir is required")
    layers = adapter_layers(model)
    ctx = adapter_context(model)
    cfg = cfg if cfg is not None else (ctx.config if ctx is not None else None)
    problems = []
    if not layers:
        problems.append("the model has no adapter layers (inject or load a LoRA first)")
    if cfg is not None and cfg.kind != "lora":
        problems.append(f"kind={cfg.kind!r} has no PEFT equivalent (use malora.save_adapter for this kind)")
    others = sorted({type(layer).__name__ for _, layer in layers if not isinstance(layer, LoRALinear)})
    if others:
        problems.append(f"the model's adapters are {others}, not LoRALinear")
    if layers and cfg is not None:
        problems += _config_differences(model, cfg)
    if problems or cfg is None:
        raise ConfigError("export_peft: cannot export a PEFT LoRA: " + "; ".join(problems or ["no config"])
                          + ". Fix: export a model injected with a LoRAConfig, passing that config or none.")
    tensors: dict[str, torch.Tensor] = {}
    conv1d = set()
    for name, layer in layers:
        for ours, theirs in (("lora_A", "lora_A.weight"), ("lora_B", "lora_B.weight")):
            tensors[f"base_model.model.{name}.{theirs}"] = getattr(layer, ours).detach()
        conv1d.add(type(layer.base).__name__ == "Conv1D")
    if len(conv1d) > 1:
        raise CheckpointError("export_peft: the adapter mixes nn.Linear and Conv1D layers, which PEFT's single "
                              "fan_in_fan_out flag cannot describe. Fix: target one kind of module.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_tensors(out / WEIGHTS_NAME, tensors, {"format": "pt"})
    _write_json(out / CONFIG_NAME, {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or _base_model_name(model),
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in layers}),
        "fan_in_fan_out": conv1d.pop(),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    })
    return out
