"""What a rerun needs to know about a study, recorded rather than recomputed: results.json ``provenance``.

- ``model``, ``model_sha256``, ``model_files``: the base model's weights. ``smollm2-135m-instruct``: the sha256 of
  the GGUF file it is converted from (``orchestrator.models.loading.smollm2_gguf_path``); a local folder: the
  sha256 of each weight file (``*.safetensors``, ``*.bin``, ``*.gguf``, ``*.pt``, ``*.pth``), ``model_sha256``
  the sha256 of their sorted ``name sha256`` lines (the file itself when there is one); a Hub id: no hash, the
  ``model_revision`` (commit) of the cached snapshot; the config-built ``tiny-llama``: its ``model_config``
  (the weights are drawn from each run's ``train.seed``).
- ``data_sha256``: ``{path relative to data_dir: sha256}`` of every file the suite reads (the same files
  ``orchestrator.data.tasks.load_task`` opens); ``{}`` with a note when the data come from the Hub.
- ``packages``: installed versions (``importlib.metadata``; ``None`` where not installed).
- ``machine``: ``orchestrator.models.hardware.machine_info()`` (CPU model and flags, GPUs, OS, Python, torch).
- ``wall_s``: the study's wall time; ``tokens_per_s``: mean training throughput over the study's runs.

``precision`` and ``formulation`` come from the runs themselves (``orchestrator.spec.recorded``); the report adds
them once it has checked that every run agrees.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.spec.space import SearchSpec

PACKAGES = ("torch", "transformers", "ray", "mlflow", "optuna", "peft", "numpy", "scipy", "malora")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
ROOT = Path(__file__).resolve().parents[2]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _combined(files: dict[str, str]) -> str | None:
    """One hash for several files: the file's own with one, else sha256 of the sorted ``name sha`` lines."""
    if not files:
        return None
    if len(files) == 1:
        return next(iter(files.values()))
    return hashlib.sha256("\n".join(f"{n} {s}" for n, s in sorted(files.items())).encode()).hexdigest()


def model_record(spec: SearchSpec) -> dict[str, Any]:
    """``model``, ``model_sha256`` and, as they apply, ``model_files``/``model_revision``/``model_config``."""
    from orchestrator.models import loading

    name = spec.model.name
    out: dict[str, Any] = {"model": name, "model_sha256": None}
    if name == loading.SMOLLM2:
        gguf = loading.smollm2_gguf_path()
        out["model_files"] = {gguf.name: file_sha256(gguf)}
    elif name == loading.TINY_LLAMA:
        model, _ = loading.build_tiny_llama(seed=spec.train.seed)
        out["model_config"] = model.config.to_diff_dict()
        out["model_note"] = "config-built; weights drawn from each run's train.seed"
    elif Path(name).is_dir():
        out["model_files"] = {str(p.relative_to(name)): file_sha256(p) for p in sorted(Path(name).rglob("*"))
                              if p.is_file() and p.suffix in WEIGHT_SUFFIXES}
    else:
        out["model_revision"] = hub_revision(name)
    out["model_sha256"] = _combined(out.get("model_files") or {})
    return out


def hub_revision(repo_id: str) -> str | None:
    """The commit of the cached Hub snapshot of ``repo_id`` (its ``snapshots/<commit>/`` folder), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent.name if isinstance(found, str) else None


def data_files(spec: SearchSpec) -> list[Path]:
    """The files the spec's suite reads from ``data.data_dir`` (empty when the data come from the Hub)."""
    from orchestrator.data.tasks import resolve_tasks

    d = spec.data
    if d.data_dir is None:
        return []
    root = Path(d.data_dir).expanduser()
    files: list[Path] = []
    for task in resolve_tasks(d.suite or list(d.tasks or ()))[1]:
        folder = root / task.source
        if task.fmt == "choice":  # train.json only where the task has one (else its pools are carved)
            names = ["train.json", "test.json"] if (folder / "train.json").is_file() else ["test.json"]
        elif task.fmt == "gsm8k":
            names = ["train.jsonl", "test.jsonl"]
        elif task.fmt in ("math", "aqua"):
            names = ["test.json"]
        elif task.fmt == "pubmedqa":
            names = ["ori_pqal.json", "test_ground_truth.json"]
        elif task.fmt == "mmlu":
            subject = task.name[len("mmlu_"):]
            names = [f"dev/{subject}_dev.csv", f"test/{subject}_test.csv"]
        else:
            raise ValueError(f"task {task.name}: data format {task.fmt!r} has no recorded files; add it here")
        files += [folder / n for n in names]
    return files


def data_sha256(spec: SearchSpec) -> dict[str, str]:
    """``{path relative to data_dir: sha256}`` of :func:`data_files`."""
    if spec.data.data_dir is None:
        return {}
    root = Path(spec.data.data_dir).expanduser()
    return {str(p.relative_to(root)): file_sha256(p) for p in data_files(spec)}


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package; ``malora`` from this checkout's pyproject.toml when not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    if out.get("malora") is None and (ROOT / "pyproject.toml").is_file():
        project = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("project", {})
        out["malora"] = project.get("version") if project.get("name") == "malora" else None
    return out


def study_provenance(spec: SearchSpec, done: Sequence[dict[str, Any]], *, wall_s: float) -> dict[str, Any]:
    """The results.json ``provenance`` block of the module docstring (without precision and formulation)."""
    from orchestrator.models.hardware import machine_info

    rates = [r["metrics"].get("tokens_per_s") for r in done]
    rates = [float(x) for x in rates if isinstance(x, (int, float)) and math.isfinite(x)]
    return {**model_record(spec), "data_dir": spec.data.data_dir,
            "data_source": "files" if spec.data.data_dir is not None else "Hugging Face Hub",
            "data_sha256": data_sha256(spec), "packages": package_versions(), "machine": machine_info(),
            "wall_s": round(float(wall_s), 1), "tokens_per_s": sum(rates) / len(rates) if rates else None}
