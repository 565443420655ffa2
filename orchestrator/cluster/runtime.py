"""The Ray runtime a search runs on: environment set before ``import ray``, and starting or joining Ray."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

TRAIN_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",  # default 2 s: a report waits up to one poll (see benchmarks)
    "TUNE_GLOBAL_CHECKPOINT_S": "2",               # experiment state is tiny; keep it fresh for --resume
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's CLIReporter with our columns (tuning.live), not the inferred table
}


def prepare_env(address: str | None) -> None:
    """Environment for Ray, set before ``import ray`` (Ray caches the auth mode at import).

    Lowers the Train health-check poll and Tune's state-save period; when joining a cluster, adds the token-auth
    mode its clients need (orchestrator.cluster.ray_cluster). A local ``ray.init`` manages its own token.
    """
    for key, value in TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if address or os.environ.get("RAY_ADDRESS"):
        from orchestrator.cluster.ray_cluster import ray_auth_env

        os.environ.update(ray_auth_env())


def init_ray(address: str | None, temp_dir: str | None = None) -> dict[str, float]:
    """Start (or join) Ray and return the cluster's total resources; ``temp_dir``: a local Ray's session folder
    (default ``$MALORA_RAY_TMP`` or ``/tmp/malora-ray-<uid>``).

    Locally: the dashboard on 127.0.0.1 at a free port, announced to every worker as ``RAY_API_SERVER_ADDRESS``.
    Ray Train's placement-group cleaner finds the State API through it; left to auto-detection it fails with
    "Found multiple active Ray instances" when another Ray runs on the machine, and stopped trials then leak
    their placement groups (later trials hang).
    """
    import ray

    if ray.is_initialized():  # a study runs its search first in the same process
        return dict(ray.cluster_resources())
    env_vars = {k: os.environ[k] for k in TRAIN_ENV_DEFAULTS}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        injected = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
        taken = set(((injected.get("runtime_env") or {}).get("env_vars") or {}))
        gcs = address if address != "auto" else os.environ.get("RAY_ADDRESS", "")
        if gcs and gcs != "auto" and "://" not in gcs:  # workers' State API calls find this cluster, not another
            env_vars["RAY_ADDRESS"] = gcs
        ray.init(address=address, runtime_env={"env_vars": {k: v for k, v in env_vars.items() if k not in taken}})
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        api = f"http://127.0.0.1:{port}"
        os.environ["RAY_API_SERVER_ADDRESS"] = env_vars["RAY_API_SERVER_ADDRESS"] = api
        temp = Path(temp_dir or os.environ.get("MALORA_RAY_TMP", f"/tmp/malora-ray-{os.getuid()}"))
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, _temp_dir=str(temp),
                 runtime_env={"env_vars": env_vars}, logging_level=logging.WARNING)
    return dict(ray.cluster_resources())
