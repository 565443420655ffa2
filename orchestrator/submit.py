"""Run the search on an existing Ray cluster as a Ray job (Jobs API), and manage that job.

    python -m orchestrator.submit --address http://HEAD:8265 --space search_spaces/intra_domain.yaml \
        --storage-path s3://bucket/malora --tracking-uri http://mlflow:5000 [--no-wait] [-- EXTRA SEARCH ARGS]
    python -m orchestrator.submit status|logs [--follow]|stop ID --address http://HEAD:8265
    python -m orchestrator.submit list --address http://HEAD:8265

``submit`` is the default action. The project folder is uploaded as the job's ``working_dir`` (minus the venv,
git, MLflow stores and caches) and the job runs ``python -m orchestrator.search ...`` with the cluster's Python,
so the cluster must have the project's dependencies installed (an image built from this repository).

Submission id: ``malora-<experiment or space name>-<8 hex>`` where the hex is a SHA-256 of what defines the
search (space file bytes, storage path, experiment, trial count, smoke flag, extra args; not ``--resume``).
Submitting the same search twice thus lands on the same id family: while that job is PENDING/RUNNING the second
submit is refused (follow or stop the first); once it has finished the new job gets ``<id>-2``, ``<id>-3``...

Exit codes: the job's final status when following (SUCCEEDED 0, FAILED/STOPPED 1); 2 for bad input and for
anything that stopped us before the job started (one line on stderr); 130 when following is interrupted.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from orchestrator.raycluster import (
    SECRET_NAME,
    ClusterError,
    alive_nodes,
    auth_headers,
    describe_auth_failure,
    normalize_dashboard_address,
    ray_auth_env,
    validate_storage_path,
    validate_tracking_uri,
)

PROG = "python -m orchestrator.submit"
COMMANDS = ("submit", "status", "logs", "stop", "list")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: Never uploaded: gitignore-style patterns relative to the working dir (Ray also honours .gitignore/.rayignore).
EXCLUDES = (".venv", "venv", ".git", "mlruns", "mlartifacts", "*.db", "__pycache__", ".pytest_cache", ".cache",
            ".mypy_cache", ".ruff_cache", "ray_results", "*.egg-info", "build", "dist", "*.safetensors", "*.gguf")
#: Copied from this environment into the job's when set here (never credentials: job env vars are shown in the
#: Ray dashboard; put secrets in the cluster nodes' environment, which the job inherits).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "MLFLOW_DISABLE_TELEMETRY",
                 "DO_NOT_TRACK", "TOKENIZERS_PARALLELISM", "MALORA_DATA_DIR")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise ClusterError(f"{self.prog}: {message}")


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS")
                   or (os.environ.get("RAY_ADDRESS", "") if os.environ.get("RAY_ADDRESS", "").startswith("http")
                       else None),
                   help="Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, or $RAY_ADDRESS "
                        "when it is an http URL)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    s = sub.add_parser("submit", help="submit the search (the default command)")
    _address_arg(s)
    s.add_argument("--space", required=True, help="search-space YAML inside the project, e.g. search_spaces/smoke.yaml")
    s.add_argument("--storage-path", required=True,
                   help="Tune/Train storage every node reaches: s3://, gs://, abfss://... or an absolute path "
                        "(local disk only on a single-node cluster, else under --shared-fs)")
    s.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI reachable from the cluster (default: $MLFLOW_TRACKING_URI)")
    s.add_argument("--experiment", help="MLflow experiment name (forwarded to the search)")
    s.add_argument("--num-trials", type=int, help="number of trials (forwarded)")
    s.add_argument("--smoke-test", action="store_true", help="forwarded: shrink steps and eval sizes")
    s.add_argument("--resume", action="store_true", help="forwarded: continue the search found at --storage-path")
    s.add_argument("--data-dir", help="benchmark data folder on the cluster nodes (sets MALORA_DATA_DIR in the job)")
    s.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="extra job env var (VALUE defaults to this shell's); not for secrets")
    s.add_argument("--submission-id", help="use this id instead of the derived one")
    s.add_argument("--multi-node", action=argparse.BooleanOptionalAction, default=None,
                   help="treat the cluster as multi-node (default: count its nodes; pass it for autoscaling clusters)")
    s.add_argument("--shared-fs", action="append", default=[], metavar="MOUNT",
                   help="absolute path mounted on every node (NFS...): local storage paths under it are accepted")
    s.add_argument("--working-dir", default=None, help="project folder to upload (default: this project's root)")
    s.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
    s.add_argument("--timeout", type=float, help="stop the job (exit 1) if it runs longer than this many seconds")
    s.add_argument("--dry-run", action="store_true", help="print the job (entrypoint, runtime env, id) and exit")
    for name, help_ in (("status", "print a submission's status"), ("stop", "stop a submission"),
                        ("logs", "print a submission's logs")):
        p = sub.add_parser(name, help=help_)
        _address_arg(p)
        p.add_argument("submission_id")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="follow until the job ends")
            p.add_argument("--timeout", type=float, help="with --follow: stop the job (exit 1) after this many seconds")
    _address_arg(sub.add_parser("list", help="list this project's submissions"))
    return parser


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
def _client_env() -> Iterator[None]:
    """RAY_AUTH_MODE=token for this process while it talks to the cluster, when a token is available."""
    added = ray_auth_env()
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def connect(address: str):
    """A JobSubmissionClient that sends the token explicitly (see orchestrator.raycluster)."""
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


def cmd_submit(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if args.dry_run:
        job = build_job(args, extra, multi_node=bool(args.multi_node))
        print(json.dumps({"address": args.address, "multi_node": args.multi_node, **job}, indent=2))
        return 0
    address = _require_address(args)
    job = build_job(args, extra, multi_node=bool(args.multi_node))  # fail fast on bad input before connecting
    client = connect(address)
    if args.multi_node is None and count_nodes(address) > 1:
        job = build_job(args, extra, multi_node=True)
    submission_id = choose_submission_id(client, job.pop("submission_id"), address)
    try:
        submission_id = client.submit_job(submission_id=submission_id, **job)
    except ValueError as exc:  # e.g. the working dir is over Ray's upload limit
        raise ClusterError(f"could not package the project: {str(exc).splitlines()[0]}") from None
    if args.no_wait:
        print(submission_id)
        print(f"submitted {submission_id} to {address}; follow: {PROG} logs {submission_id} --follow "
              f"--address {address}", file=sys.stderr)
        return 0
    print(f"submitted {submission_id} to {address}; following its logs (Ctrl-C leaves it running)", file=sys.stderr)
    return follow(client, submission_id, timeout=args.timeout)


def _require_address(args: argparse.Namespace) -> str:
    if not args.address:
        raise ClusterError("no cluster given: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    return normalize_dashboard_address(args.address)


def _existing(client, submission_id: str, address: str):
    info = job_info_or_none(client, submission_id)
    if info is None:
        raise ClusterError(f"no submission {submission_id} on {address} (`{PROG} list --address {address}`)")
    return info


def cmd_other(args: argparse.Namespace) -> int:
    address = _require_address(args)
    client = connect(address)
    if args.command == "list":
        jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
        for job in jobs:
            if (job.submission_id or "").startswith("malora-") or "orchestrator.search" in (job.entrypoint or ""):
                print(f"{job.submission_id}\t{job.status.value}\t{job.entrypoint}")
        return 0
    info = _existing(client, args.submission_id, address)
    if args.command == "status":
        print(f"{args.submission_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
        return 0
    if args.command == "stop":
        stopped = client.stop_job(args.submission_id)
        print(f"{args.submission_id}: " + ("stop requested" if stopped else f"not running ({info.status.value})"))
        return 0
    if args.follow:
        return follow(client, args.submission_id, timeout=args.timeout)
    sys.stdout.write(client.get_job_logs(args.submission_id))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["submit", *argv]
    try:
        args = build_parser().parse_args(argv)
        if extra and args.command != "submit":
            raise ClusterError(f"arguments after -- are only for submit, got: {' '.join(extra)}")
        with _client_env():
            from ray.exceptions import AuthenticationError

            try:
                return cmd_submit(args, extra) if args.command == "submit" else cmd_other(args)
            except AuthenticationError as exc:
                raise ClusterError(describe_auth_failure(exc.message, args.address or "")) from None
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not str(exc).startswith("Request failed"):  # not the Jobs API's own error: a bug, keep the traceback
            raise
        print(f"error: the Ray dashboard at {args.address}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


if __name__ == "__main__":
    sys.exit(main())
