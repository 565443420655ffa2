"""What the machine computes with: CPU model and flags, GPUs, and the numeric precision that follows from them.

Runs record this (results.json ``provenance.machine``, an MLflow param) because a figure measured on one machine
says little about another: a Xeon core with AMX tiles runs bf16 matrix products ~8x faster than fp32, an AVX2-only
EPYC core runs them slower than fp32.

``resolve_precision("auto", device)`` picks bf16 where the device computes it natively (a CUDA GPU that supports
bf16, or a CPU with AMX-BF16 or AVX512-BF16) and fp32 elsewhere; an explicit request is kept as asked, and an
explicit bf16 on a device without bf16 units (where it runs emulated, slower than fp32) logs one warning per
process and device.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

import torch

__all__ = ["PRECISIONS", "BF16_CPU_FLAGS", "cpu_info", "gpu_info", "machine_info", "native_bf16", "resolve_precision"]

logger = logging.getLogger(__name__)
PRECISIONS = ("auto", "bf16", "fp32", "fp16")
# /proc/cpuinfo flags that give the CPU native bf16 matrix products (oneDNN uses them through torch)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# flags worth recording beside any CPU figure: what the matrix kernels can use
_RECORDED_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx512_vnni", "avx2", "fma")
_WARNED: set[str] = set()  # devices (their evidence) already warned about an explicit bf16 without bf16 units


@functools.cache
def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """{"model": str, "flags": [recorded flags present], "logical_cpus": int} of this machine's CPU.

    Reads /proc/cpuinfo where it exists (Linux); elsewhere the model is ``platform.processor()`` and no flags.
    """
    model, flags = "", set()
    path = Path(cpuinfo)
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    return {"model": model or platform.processor() or platform.machine(), "flags": [f for f in _RECORDED_FLAGS if f in flags],
            "logical_cpus": os.cpu_count() or 1}


def gpu_info() -> list[dict]:
    """[{"name", "memory_gib", "capability", "bf16"}] per visible CUDA device; [] without CUDA."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                    "capability": f"{p.major}.{p.minor}", "bf16": p.major >= 8})
    return out


def machine_info() -> dict:
    """The machine a figure was measured on: CPU model and flags, GPUs, OS, Python and torch versions."""
    return {"cpu": cpu_info(), "gpus": gpu_info(), "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 matrix products natively, and the evidence, in words."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(index)
        ok = p.major >= 8  # Ampere and newer have bf16 tensor cores
        return ok, f"{p.name} (compute capability {p.major}.{p.minor}{'' if ok else ', no bf16 tensor cores'})"
    if device.type == "cpu":
        info = cpu_info()
        found = [f for f in BF16_CPU_FLAGS if f in info["flags"]]
        if found:
            return True, f"{info['model']} has {', '.join(found)}"
        return False, f"{info['model']} has neither {' nor '.join(BF16_CPU_FLAGS)}"
    return False, f"device type {device.type!r} is not known to compute bf16 natively"


def resolve_precision(requested: str, device: torch.device | str) -> tuple[str, str]:
    """(precision actually used, why) for a requested ``auto | bf16 | fp32 | fp16`` on ``device``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested == "bf16":
        ok, why = native_bf16(device)
        if not ok and why not in _WARNED:
            _WARNED.add(why)
            logger.warning("precision bf16 was asked for explicitly, but %s: bf16 runs emulated there, slower than "
                           "fp32 (precision: auto picks fp32 on this device)", why)
    if requested != "auto":
        return requested, "asked for explicitly"
    ok, why = native_bf16(device)
    return ("bf16", f"auto: {why}") if ok else ("fp32", f"auto: {why}")
