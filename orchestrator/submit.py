"""Run the search on an existing Ray cluster as a Ray job (Jobs API), and manage that job.

    python -m orchestrator.submit --address http://HEAD:8265 --space search_spaces/intra_domain.yaml \
        --storage-path s3://bucket/malora --tracking-uri http://mlflow:5000 [--no-wait] [-- EXTRA SEARCH ARGS]
    python -m orchestrator.submit status|logs [--follow]|stop ID --address http://HEAD:8265
    python -m orchestrator.submit list --address http://HEAD:8265

``submit`` is the default action. The project folder is uploaded as the job's ``working_dir`` (minus the venv,
git, MLflow stores and caches) and the job runs ``python -m orchestrator.search ...`` with the cluster's Python,
so the cluster must have the project's dependencies installed (an image built from this repository).

Submission ids, the job's runtime env and following: :mod:`orchestrator.cluster.jobs`.

Exit codes: the job's final status when following (SUCCEEDED 0, FAILED/STOPPED 1); 2 for bad input and for
anything that stopped us before the job started (one line on stderr); 130 when following is interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from orchestrator.cluster.jobs import (
    PROG,
    client_env,
    build_job,
    choose_submission_id,
    connect,
    count_nodes,
    follow,
    job_info_or_none,
)
from orchestrator.cluster.ray_cluster import ClusterError, describe_auth_failure, normalize_dashboard_address

COMMANDS = ("submit", "status", "logs", "stop", "list")


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
        with client_env():
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
