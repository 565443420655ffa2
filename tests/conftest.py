"""Shared pytest fixtures and environment for the whole suite.

The environment defaults are set at import time, before any test imports transformers, datasets, Ray or MLflow,
so that nothing reaches for the Hugging Face Hub (which fails slowly without network) or phones home.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_shared_data_dir() -> Path | None:
    """``$MALORA_DATA_DIR`` if set, else ``../shared/data`` beside the repository, else None."""
    env = os.environ.get("MALORA_DATA_DIR")
    candidate = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real benchmark files (read-only); skips the test with a reason when they are absent."""
    path = find_shared_data_dir()
    if path is None:
        pytest.skip("real data not found: set MALORA_DATA_DIR or place the shared data at ../shared/data")
    return path


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests on machines without CUDA (CI and laptops), with the reason shown by `-ra`."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
