"""Run the search on Kubernetes as a KubeRay ``RayJob``: render the manifest, apply it, watch it, delete it.

    python -m orchestrator.k8s render --space search_spaces/intra_domain.yaml --image REGISTRY/malora:TAG \
        --workers 2 --gpus-per-worker 1 --storage-path s3://bucket/malora --mlflow-uri http://mlflow:5000 \
        --secret aws-creds:AWS_ACCESS_KEY_ID --secret aws-creds:AWS_SECRET_ACCESS_KEY > rayjob.yaml
    python -m orchestrator.k8s apply -f rayjob.yaml          # or: apply with the render options
    python -m orchestrator.k8s status NAME | delete NAME [--namespace NS]

What the RayJob runs, how retries resume, and the image and credential rules: :mod:`orchestrator.cluster.kuberay`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from orchestrator.cluster.kuberay import (
    MAX_NAME,
    PROG,
    check,
    load_manifest,
    apply,
    custom_objects_api,
    delete,
    render_rayjob,
    status,
    to_yaml,
)
from orchestrator.cluster.ray_cluster import ClusterError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise ClusterError(f"{self.prog}: {message}")


def _render_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--space", required=required, help="search-space YAML inside the project")
    p.add_argument("--image", required=required, help="container image holding the project (see the module doc)")
    p.add_argument("--workers", type=int, default=1, help="GPU worker pods (default 1)")
    p.add_argument("--gpus-per-worker", type=int, default=1, help="nvidia.com/gpu per worker pod (0: CPU workers)")
    p.add_argument("--cpus-per-worker", default="8", help="CPU request = limit per worker pod (default 8)")
    p.add_argument("--memory-per-worker", default="32Gi", help="memory request = limit per worker pod (default 32Gi)")
    p.add_argument("--head-cpus", default="2", help="head pod CPU (it runs the search driver only)")
    p.add_argument("--head-memory", default="8Gi", help="head pod memory")
    p.add_argument("--storage-path", required=required,
                   help="shared storage for trials, adapters and resume: s3://, gs://, abfss://... or a path under --pvc")
    p.add_argument("--mlflow-uri", required=required, help="MLflow tracking server the pods reach, e.g. http://mlflow:5000")
    p.add_argument("--experiment", help="MLflow experiment name (forwarded to the search)")
    p.add_argument("--num-trials", type=int, help="number of trials (forwarded)")
    p.add_argument("--smoke-test", action="store_true", help="forwarded: shrink steps and eval sizes")
    p.add_argument("--data-dir", help="benchmark data folder inside the pods (sets MALORA_DATA_DIR)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--name", help=f"RayJob name (default: malora-<space>-<hash>; DNS label, <= {MAX_NAME} chars)")
    p.add_argument("--secret", action="append", default=[], metavar="SECRET:KEY[=ENV]",
                   help="env var ENV (default KEY) from key KEY of Secret SECRET, e.g. mlflow:token=MLFLOW_TRACKING_TOKEN")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="plain env var (not for credentials)")
    p.add_argument("--pvc", action="append", default=[], metavar="CLAIM:MOUNT",
                   help="mount a ReadWriteMany PersistentVolumeClaim in every pod; storage under MOUNT is then shared")
    p.add_argument("--workdir", default="/app", help="where the image holds the project (default /app)")
    p.add_argument("--backoff-limit", type=int, default=2, help="retries, each on a new cluster (default 2)")
    p.add_argument("--ttl-seconds", type=int, default=3600, help="delete the RayJob this long after it ends")
    p.add_argument("--active-deadline-seconds", type=int, help="fail the RayJob after this long")
    p.add_argument("--ray-version", default=None, help="Ray version of the image (default: this environment's)")
    p.add_argument("--token-auth", action="store_true",
                   help="turn on Ray token auth (KubeRay >= 1.5.1 generates the token Secret and wires it)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    render = sub.add_parser("render", help="print the RayJob manifest")
    _render_args(render)
    render.add_argument("-o", "--output", help="write to this file instead of stdout")
    apply = sub.add_parser("apply", help="create the RayJob (from -f FILE or from the render options)")
    apply.add_argument("-f", "--file", help="a manifest written by render")
    _render_args(apply, required=False)
    for name in ("status", "delete"):
        p = sub.add_parser(name, help=f"{name} a RayJob")
        p.add_argument("name")
        p.add_argument("--namespace", default="default")
    for p in sub.choices.values():
        p.add_argument("--context", help="kubeconfig context (default: the current one)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "render":
            text = to_yaml(render_rayjob(args))
            if args.output:
                Path(args.output).write_text(text)
            else:
                sys.stdout.write(text)
            return 0
        if args.command == "apply":
            if args.file:
                manifest = load_manifest(args.file)
            else:
                missing = [f for f in ("space", "image", "storage_path", "mlflow_uri") if not getattr(args, f)]
                check(not missing, "apply needs -f FILE or the render options; missing: "
                       + ", ".join("--" + m.replace("_", "-") for m in missing))
                manifest = render_rayjob(args)
            created = apply(manifest, custom_objects_api(args.context))
            meta = created.get("metadata", manifest["metadata"])
            print(f"created RayJob {meta.get('namespace', 'default')}/{meta['name']}; "
                  f"watch: {PROG} status {meta['name']} --namespace {meta.get('namespace', 'default')}")
            return 0
        api = custom_objects_api(args.context)
        if args.command == "status":
            fields = status(args.name, args.namespace, api)
            for key, value in fields.items():
                print(f"{key}: {value}")
            if not fields:
                print("jobDeploymentStatus: (none yet: the operator has not reconciled it)")
            return 0
        delete(args.name, args.namespace, api)
        print(f"deleted RayJob {args.namespace}/{args.name} (KubeRay removes its Ray cluster)")
        return 0
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


if __name__ == "__main__":
    sys.exit(main())
