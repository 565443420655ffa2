"""The numeric precision of a run: what it computes in, what the frozen base weights are held in, and why.

Three settings meet here: ``train.precision`` and ``eval.precision`` (``auto | bf16 | fp32 | fp16``, resolved on
the device by :func:`orchestrator.models.hardware.resolve_precision`) and ``model.dtype`` (``auto | float32 |
bfloat16 | float16``, the dtype the frozen base is held in). ``model.dtype: auto`` follows the training precision:

    precision  held base weights   how the matrix products run
    bf16       bfloat16            natively in bf16 (no cast of the frozen weights per step), no autocast
    fp32       float32             fp32
    fp16       float32             under ``torch.autocast(float16)`` (fp16's narrow range keeps the residual
                                   stream in fp32; the GradScaler guards the backward)

Adapter master weights and the AdamW state stay float32 in every case (``malora.layers.base.adapter_dtype``):
the layers cast their small adapter matrices to the activations' dtype in the forward. An explicit
``model.dtype: float32`` with ``bf16`` is the autocast path (fp32 weights cast per op). Weights held in a
low-precision dtype other than the computing one cannot compute it (bfloat16 weights cannot give an fp32 run),
so that pairing is one error naming both keys and the fix (:func:`conflict`), never a silent change.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
from dataclasses import dataclass

import torch

from orchestrator.models.hardware import resolve_precision

__all__ = ["FP32", "MODEL_DTYPES", "Precision", "PrecisionError", "conflict", "held_dtype", "plan_precision",
           "keep_freed_memory", "plan_run"]

logger = logging.getLogger(__name__)
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPUTE_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
AUTO_HELD = {"bf16": "bfloat16", "fp16": "float32", "fp32": "float32"}


class PrecisionError(ValueError):
    """Settings that disagree about the precision; the message names the keys and the fix."""


def held_dtype(model_dtype: str, precision: str) -> str:
    """The dtype the frozen base is held in for a resolved ``precision`` (bf16 | fp32 | fp16)."""
    return AUTO_HELD[precision] if model_dtype == "auto" else model_dtype


def conflict(precision: str, weights: str, key: str = "train.precision", dtype_key: str = "model.dtype") -> str | None:
    """Why base weights held in ``weights`` cannot compute ``precision`` (resolved), or None when they can.

    Allowed: float32 weights (any precision; bf16/fp16 then run under autocast) or weights already in the
    computing dtype.
    """
    if weights in ("float32", COMPUTE_DTYPE[precision]):
        return None
    return (f"{key}: {precision} with {dtype_key}: {weights} -- {weights} base weights cannot compute {precision}. "
            f"Fix: {dtype_key}: auto (or float32), or {key}: {'bf16' if weights == 'bfloat16' else 'fp16'}")


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` (bf16 | fp32 | fp16), ``reason`` (in words, recorded with the run) and
    ``weights``, the dtype the frozen base is held in (float32 | bfloat16 | float16)."""

    name: str
    reason: str
    weights: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype when the weights are held in float32 but the run computes in bf16/fp16, else None."""
        if self.name == "fp32" or self.weights == COMPUTE_DTYPE[self.name]:
            return None
        return getattr(torch, COMPUTE_DTYPE[self.name])

    def context(self, device_type: str) -> contextlib.AbstractContextManager:
        """``torch.autocast`` where :attr:`autocast_dtype` asks for it, else a no-op."""
        dtype = self.autocast_dtype
        return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def record(self, prefix: str = "") -> dict[str, str]:
        """``{prefix + "precision": name, prefix + "precision_reason": reason}`` for metrics, params, results."""
        return {f"{prefix}precision": self.name,
                f"{prefix}precision_reason": f"{self.reason}; base weights {self.weights}"}


def plan_precision(requested: str, model_dtype: str, device: torch.device | str, *,
                   key: str = "train.precision", dtype_key: str = "model.dtype") -> Precision:
    """Resolve ``requested`` on ``device`` and the weights it runs on; raise :class:`PrecisionError` on a conflict.

    ``model_dtype`` is ``model.dtype`` (``auto`` follows the precision) or, for evaluation, the dtype the
    training already holds the base in.
    """
    if model_dtype not in MODEL_DTYPES:
        raise PrecisionError(f"{dtype_key}: {model_dtype!r} is not one of {', '.join(MODEL_DTYPES)}")
    name, reason = resolve_precision(requested, device)
    if name == "fp16" and torch.device(device).type == "cpu":
        raise PrecisionError(f"{key}: fp16 needs a GPU (CPUs compute fp16 slowly, without loss scaling support). "
                             f"Fix: {key}: auto, bf16 or fp32")
    weights = held_dtype(model_dtype, name)
    problem = conflict(name, weights, key, dtype_key)
    if problem:
        raise PrecisionError(problem)
    return Precision(name, reason, weights)


def plan_run(model_dtype: str, train: str, evaluation: str, device: torch.device | str) -> tuple[Precision, Precision]:
    """(training's, scoring's) precision of a run: scoring computes on the weights training holds.

    ``eval.precision: auto`` resolves on the device like ``train.precision: auto``, except where the weights
    training holds cannot compute that: ``train.precision: bf16`` holds the base in bfloat16, and on a device
    without bf16 units auto's fp32 is impossible there, so scoring follows training (bf16) and says so in its
    reason. Where scoring resolves to another precision than training (fp16 training: bf16 scoring on an A100, fp32
    on a V100) the reason names both, so the recorded ``eval_precision_reason`` tells why.
    """
    trained = plan_precision(train, model_dtype, device)
    if evaluation != "auto":
        return trained, plan_precision(evaluation, trained.weights, device, key="eval.precision")
    name, why = resolve_precision("auto", device)
    if conflict(name, trained.weights) is not None:
        return trained, Precision(trained.name, f"auto: follows train.precision {trained.name}, since base weights "
                                  f"held in {trained.weights} cannot compute {name} ({why})", trained.weights)
    if name != trained.name:
        why += (f"; scoring computes {name} while training computes {trained.name} (eval.precision: auto resolves "
                f"on the device; eval.precision: {trained.name} scores as trained)")
    return trained, Precision(name, why, trained.weights)


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 32 MiB in the heap instead of unmapping them (once per process).

    By default glibc serves blocks above a (dynamic) threshold with ``mmap`` and returns them on ``free``: every
    training step then allocates its activations and gradients afresh and the kernel zero-fills each page on
    first touch. On one SmolLM2 step that page-fault cost made a (64, 49152) log-softmax 45 ms instead of 6 ms
    (profiled; over whole interleaved steps the gain was within the shared machine's noise, ``benchmarks/README.md``,
    issue 19). ``mallopt(M_MMAP_THRESHOLD, 32 MiB)`` (the largest glibc accepts;
    fixing it also stops the threshold from moving) and ``M_TRIM_THRESHOLD`` keep the pages mapped. Returns
    whether glibc took the settings (False on other C libraries: nothing changes there).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc malloc.h
    ok = bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, 2**30))
    logger.info("glibc keeps freed blocks up to 32 MiB mapped: %s", ok)
    return ok


FP32 = Precision("fp32", "default", "float32")
"""What a run that resolved nothing computes in (a hand-built ``TrialModel``): fp32 on float32 weights."""
