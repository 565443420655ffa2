"""Shared pieces of the end-to-end tests: the subprocess environment and the MLflow client of a test's store."""

from __future__ import annotations

import os
from pathlib import Path


def subprocess_env(shared_data_dir: Path) -> dict[str, str]:
    """This environment for a ``python -m orchestrator.*`` subprocess: offline, local Ray, the test's own MLflow."""
    env = dict(os.environ, MALORA_DATA_DIR=str(shared_data_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def mlflow_client(tmp_path: Path):
    """A client of the SQLite store the commands create in their working directory ``tmp_path``."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
