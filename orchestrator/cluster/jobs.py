"""Ray jobs for the search on an existing cluster: the job's entrypoint, id, runtime env, and following it.

Used by ``python -m orchestrator.submit`` (the command's argparse namespace is the input of :func:`build_job`).

Submission id: ``malora-<experiment or space name>-<8 hex>`` where the hex is a SHA-256 of what defines the
search (space file bytes, storage path, experiment, trial count, smoke flag, extra args; not ``--resume``).
Submitting the same search twice thus lands on the same id family: while that job is PENDING/RUNNING the second
submit is refused (follow or stop the first); once it has finished the new job gets ``<id>-2``, ``<id>-3``...
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from orchestrator.cluster.ray_cluster import (
    SECRET_NAME,
    ClusterError,
    alive_nodes,
    auth_headers,
    ray_auth_env,
    validate_storage_path,
    validate_tracking_uri,
)

PROG = "python -m orchestrator.submit"  # named in messages that tell the user what to run next
PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: Never uploaded: gitignore-style patterns relative to the working dir (Ray also honours .gitignore/.rayignore).
EXCLUDES = (".venv", "venv", ".git", "mlruns", "mlartifacts", "*.db", "__pycache__", ".pytest_cache", ".cache",
            ".mypy_cache", ".ruff_cache", "ray_results", "*.egg-info", "build", "dist", "*.safetensors", "*.gguf")
#: Copied from this environment into the job's when set here (never credentials: job env vars are shown in the
#: Ray dashboard; put secrets in the cluster nodes' environment, which the job inherits).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "MLFLOW_DISABLE_TELEMETRY",
                 "DO_NOT_TRACK", "TOKENIZERS_PARALLELISM", "MALORA_DATA_DIR")


# ------------------------------------------------------------------------------------------- the job itself
def slug(text: str, max_len: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].strip("-") or "search"


def derive_submission_id(space_bytes: bytes, name: str, storage_path: str, search_args: Sequence[str]) -> str:
    """``malora-<slug(name)>-<sha256(space, storage, args)[:8]>``; ``--resume`` does not change it."""
    h = hashlib.sha256(space_bytes)
    for part in (storage_path, *[a for a in search_args if a != "--resume"]):
        h.update(b"\0" + part.encode())
    return f"malora-{slug(name)}-{h.hexdigest()[:8]}"


def search_arguments(args: argparse.Namespace, space_rel: str, storage: str, extra: Sequence[str]) -> list[str]:
    """The ``orchestrator.search`` argv the job runs (``--address auto``: the job's own cluster)."""
    argv = ["--space", space_rel, "--address", "auto", "--storage-path", storage, "--tracking-uri", args.tracking_uri]
    if args.experiment:
        argv += ["--experiment", args.experiment]
    if args.num_trials is not None:
        argv += ["--num-trials", str(args.num_trials)]
    if args.smoke_test:
        argv.append("--smoke-test")
    if args.resume:
        argv.append("--resume")
    return argv + list(extra)


def job_env(args: argparse.Namespace, storage: str, environ=None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    out = {k: env[k] for k in FORWARDED_ENV if env.get(k)}
    out.update(MLFLOW_TRACKING_URI=args.tracking_uri, MALORA_STORAGE_PATH=storage)
    if args.data_dir:
        out["MALORA_DATA_DIR"] = args.data_dir
    for item in args.env:
        key, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ClusterError(f"--env {item}: {key!r} is not an environment variable name")
        if SECRET_NAME.search(key):
            raise ClusterError(f"--env {key}: looks like a credential, and job env vars are shown in the Ray "
                               "dashboard; set it in the cluster nodes' environment instead (the job inherits it)")
        if not sep:
            if key not in env:
                raise ClusterError(f"--env {key}: not set in this shell; give --env {key}=VALUE")
            value = env[key]
        out[key] = value
    return out


def resolve_space(space: str, working_dir: Path) -> tuple[str, bytes]:
    path = Path(space).expanduser().resolve()
    if not path.is_file():
        raise ClusterError(f"--space {space}: no such file")
    try:
        rel = path.relative_to(working_dir)
    except ValueError:
        raise ClusterError(f"--space {space} is outside the uploaded project {working_dir}: copy it under "
                           f"{working_dir / 'search_spaces'}") from None
    return rel.as_posix(), path.read_bytes()


def build_job(args: argparse.Namespace, extra: Sequence[str], multi_node: bool) -> dict:
    """Everything ``submit_job`` gets, validated; pure (no cluster contact)."""
    working_dir = Path(args.working_dir).resolve() if args.working_dir else PROJECT_ROOT
    if not (working_dir / "orchestrator").is_dir():
        raise ClusterError(f"--working-dir {working_dir} does not hold the orchestrator package: give the project root")
    space_rel, space_bytes = resolve_space(args.space, working_dir)
    storage = validate_storage_path(args.storage_path, multi_node, shared_fs=args.shared_fs, allow_relative=False)
    validate_tracking_uri(args.tracking_uri, multi_node, shared_fs=args.shared_fs)
    search_argv = search_arguments(args, space_rel, storage, extra)
    excludes = list(EXCLUDES)
    with contextlib.suppress(ValueError):  # a local storage folder inside the project must not be uploaded
        excludes.append("/" + Path(storage).relative_to(working_dir).as_posix())
    name = args.experiment or Path(space_rel).stem
    derived = derive_submission_id(space_bytes, name, storage, search_argv)
    return {
        "submission_id": args.submission_id or derived,
        "entrypoint": shlex.join(["python", "-m", "orchestrator.search", *search_argv]),
        "runtime_env": {"working_dir": str(working_dir), "excludes": excludes,
                        "env_vars": job_env(args, storage)},
        "metadata": {"malora_space": space_rel, "malora_storage_path": storage},
    }


# --------------------------------------------------------------------------------------- cluster operations
@contextlib.contextmanager
def client_env() -> Iterator[None]:
    """RAY_AUTH_MODE=token for this process while it talks to the cluster, when a token is available."""
    added = ray_auth_env()
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def connect(address: str):
    """A JobSubmissionClient that sends the token explicitly (see orchestrator.cluster.ray_cluster)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except ConnectionError:
        raise ClusterError(f"cannot reach a Ray dashboard at {address}: is the head running, and is this its "
                           "dashboard port (default 8265, not the GCS port 6379)?") from None


def job_info_or_none(client, submission_id: str):
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            return None
        raise


def choose_submission_id(client, base: str, address: str) -> str:
    """``base`` if unused, else the first free ``base-N``; refuses while one of them is still active."""
    for n in range(1, 1000):
        candidate = base if n == 1 else f"{base}-{n}"
        info = job_info_or_none(client, candidate)
        if info is None:
            return candidate
        if not info.status.is_terminal():
            raise ClusterError(
                f"submission {candidate} is already {info.status.value} on {address}: follow it with `{PROG} logs "
                f"{candidate} --follow --address {address}` or stop it with `{PROG} stop {candidate} --address "
                f"{address}`")
    raise ClusterError(f"1000 submissions named {base}-N exist on {address}: pass --submission-id")


def count_nodes(address: str) -> int:
    try:
        return len(alive_nodes(address, auth_headers()))
    except Exception as exc:  # noqa: BLE001 (any failure means: unknown; the user decides)
        raise ClusterError(f"could not count the nodes of the cluster at {address} ({type(exc).__name__}: {exc}); "
                           "pass --multi-node or --no-multi-node") from None


def follow(client, submission_id: str, out=None, poll_s: float = 1.0, timeout: float | None = None) -> int:
    """Stream the job's logs until it ends; the exit code from its final status.

    With ``timeout`` (seconds) a job still running after that long is stopped, and the result is 1.
    """
    out = out or sys.stdout
    started = time.monotonic()

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(_tail(), timeout))
    except KeyboardInterrupt:
        print(f"stopped following; {submission_id} keeps running (`{PROG} stop {submission_id}`)", file=sys.stderr)
        return 130
    except TimeoutError:
        pass
    except Exception as exc:  # noqa: BLE001 (log stream lost: head restarted, proxy timeout...): poll the status
        print(f"log stream ended early ({exc}); waiting for the job status", file=sys.stderr)
    stopped = False
    while not (info := client.get_job_info(submission_id)).status.is_terminal():
        if not stopped and timeout is not None and time.monotonic() - started > timeout:
            print(f"{submission_id} ran past --timeout {timeout:g}s: stopping it", file=sys.stderr)
            client.stop_job(submission_id)
            stopped = True
        time.sleep(poll_s)
    print(f"job {submission_id} finished: {info.status.value}" + (f" ({info.message})" if info.message else ""),
          file=sys.stderr)
    return 0 if info.status.value == "SUCCEEDED" and not stopped else 1
