"""The KubeRay ``RayJob`` for the search: render and validate the manifest; apply, read and delete it.

Used by ``python -m orchestrator.k8s`` (usage in that module).

The RayJob brings up a Ray cluster -- a head pod that schedules nothing (``num-cpus: 0``, no GPU: every trial and
Train worker lands on a worker pod) and one GPU worker group -- runs ``python -m orchestrator.search --resume``
on it through a submitter Kubernetes Job (``K8sJobMode``), then deletes the cluster (``shutdownAfterJobFinishes``)
and, ``ttlSecondsAfterFinished`` later, the RayJob. A failed attempt is retried on a *fresh* cluster up to
``backoffLimit`` times; because the entrypoint resumes from ``--storage-path`` (shared storage, never a pod's
disk), a retry continues the search instead of starting over.

The image must hold this repository at ``--workdir`` (default ``/app``) with its dependencies installed (e.g.
``COPY . /app`` and ``pip install -e /app``). Credentials reach the pods only as ``secretKeyRef`` references to
existing Secrets (``--secret SECRET:KEY[=ENV]``); no value is ever written into the manifest. ``apply``, ``status``
and ``delete`` use the official ``kubernetes`` client, an optional extra: ``pip install 'malora[k8s]'``.
"""
from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path
from typing import Any

import yaml

from orchestrator.cluster.ray_cluster import SECRET_NAME, ClusterError, validate_storage_path, validate_tracking_uri

PROG = "python -m orchestrator.k8s"  # named in messages that tell the user what to run next
GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NAME = 47  # KubeRay appends a suffix for the RayCluster and its pods; longer RayJob names are rejected


# ------------------------------------------------------------------------------------------------ rendering
def check(cond: bool, message: str) -> None:
    if not cond:
        raise ClusterError(message)


def parse_secret(item: str) -> dict:
    """``SECRET:KEY[=ENV]`` -> an env entry with ``valueFrom.secretKeyRef`` (the value stays in the Secret)."""
    secret, sep, rest = item.partition(":")
    key, _, env = rest.partition("=")
    env = env or key
    check(bool(sep) and bool(key), f"--secret {item}: expected SECRET:KEY[=ENV], e.g. aws-creds:AWS_SECRET_ACCESS_KEY")
    check(bool(DNS_SUBDOMAIN.match(secret)) and len(secret) <= 253,
           f"--secret {item}: {secret!r} is not a Secret name (lowercase letters, digits, '-', '.')")
    check(bool(re.fullmatch(r"[-._a-zA-Z0-9]+", key)), f"--secret {item}: {key!r} is not a Secret key")
    check(bool(ENV_NAME.match(env)), f"--secret {item}: {env!r} is not an env var name; add =ENV_NAME")
    return {"name": env, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def parse_pvc(item: str) -> tuple[str, str]:
    claim, sep, mount = item.partition(":")
    check(bool(sep) and bool(DNS_SUBDOMAIN.match(claim)) and mount.startswith("/"),
           f"--pvc {item}: expected CLAIM:/ABSOLUTE/MOUNT, e.g. shared-rwx:/mnt/shared")
    return claim, mount.rstrip("/") or "/"


def _quantity(value: str, flag: str) -> str:
    check(bool(QUANTITY.match(str(value))), f"{flag} {value}: not a Kubernetes quantity (e.g. 8, 7500m, 32Gi)")
    return str(value)


def default_name(space_rel: str, space_bytes: bytes, storage: str) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", Path(space_rel).stem.lower()).strip("-") or "search"
    digest = hashlib.sha256(space_bytes + b"\0" + storage.encode()).hexdigest()[:6]
    return f"malora-{stem[:MAX_NAME - 14].strip('-')}-{digest}"


def _space(space: str) -> tuple[str, bytes]:
    path = Path(space).expanduser().resolve()
    check(path.is_file(), f"--space {space}: no such file")
    try:
        return path.relative_to(PROJECT_ROOT).as_posix(), path.read_bytes()
    except ValueError:
        raise ClusterError(f"--space {space} is outside the project {PROJECT_ROOT}, so the image does not hold it: "
                           "copy it under search_spaces/ and rebuild the image") from None


def _container(name: str, args: argparse.Namespace, env: list[dict], resources: dict, mounts: list[dict]) -> dict:
    c = {"name": name, "image": args.image, "workingDir": args.workdir, "env": env, "resources": resources}
    if mounts:
        c["volumeMounts"] = mounts
    return c


def render_rayjob(args: argparse.Namespace) -> dict:
    """The RayJob manifest for ``args`` (the render options), validated; no cluster contact."""
    check(bool(args.image and args.image.strip()), "--image is empty: give the image built from this project")
    check(args.workers >= 1, f"--workers {args.workers}: need at least 1 worker pod")
    check(args.gpus_per_worker >= 0, f"--gpus-per-worker {args.gpus_per_worker}: must be >= 0")
    check(args.backoff_limit >= 0, f"--backoff-limit {args.backoff_limit}: must be >= 0")
    check(args.ttl_seconds >= 0, f"--ttl-seconds {args.ttl_seconds}: must be >= 0")
    check(bool(DNS_LABEL.match(args.namespace)) and len(args.namespace) <= 63,
           f"--namespace {args.namespace}: not a namespace name (lowercase letters, digits, '-')")
    check(args.workdir.startswith("/"), f"--workdir {args.workdir}: must be an absolute path in the image")
    pvcs = [parse_pvc(p) for p in args.pvc]
    mounts = [m for _, m in pvcs]
    shared = "--pvc CLAIM:MOUNT (a ReadWriteMany volume mounted in every pod)"
    storage = validate_storage_path(args.storage_path, True, shared_fs=mounts, allow_relative=False,
                                    shared_flag=shared)
    validate_tracking_uri(args.mlflow_uri, True, shared_fs=mounts, flag="--mlflow-uri", shared_flag=shared)
    space_rel, space_bytes = _space(args.space)
    name = args.name or default_name(space_rel, space_bytes, storage)
    check(bool(DNS_LABEL.match(name)) and len(name) <= MAX_NAME,
           f"--name {name}: must be a DNS label (lowercase letters, digits, '-'; starts with a letter) of <= {MAX_NAME} chars")

    env = [{"name": "MLFLOW_TRACKING_URI", "value": args.mlflow_uri},
           {"name": "MALORA_STORAGE_PATH", "value": storage}]
    if args.data_dir:
        env.append({"name": "MALORA_DATA_DIR", "value": args.data_dir})
    for item in args.env:
        key, sep, value = item.partition("=")
        check(bool(sep) and bool(ENV_NAME.match(key)), f"--env {item}: expected KEY=VALUE")
        check(not SECRET_NAME.search(key), f"--env {key}: looks like a credential; reference a Secret with "
                                            f"--secret SECRET:KEY={key} instead of writing its value in the manifest")
        env.append({"name": key, "value": value})
    env += [parse_secret(s) for s in args.secret]
    names = [e["name"] for e in env]
    check(len(set(names)) == len(names), f"env var set twice: {sorted({n for n in names if names.count(n) > 1})}")

    search = ["python", "-m", "orchestrator.search", "--space", f"{args.workdir.rstrip('/')}/{space_rel}",
              "--address", "auto", "--resume", "--storage-path", storage, "--tracking-uri", args.mlflow_uri]
    if args.experiment:
        search += ["--experiment", args.experiment]
    if args.num_trials is not None:
        search += ["--num-trials", str(args.num_trials)]
    if args.smoke_test:
        search.append("--smoke-test")

    volumes = [{"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": c}} for i, (c, _) in enumerate(pvcs)]
    pvc_mounts = [{"name": f"pvc-{i}", "mountPath": m} for i, (_, m) in enumerate(pvcs)]
    head_res = {"cpu": _quantity(args.head_cpus, "--head-cpus"), "memory": _quantity(args.head_memory, "--head-memory")}
    worker_res = {"cpu": _quantity(args.cpus_per_worker, "--cpus-per-worker"),
                  "memory": _quantity(args.memory_per_worker, "--memory-per-worker")}
    if args.gpus_per_worker:
        worker_res["nvidia.com/gpu"] = str(args.gpus_per_worker)
    head = _container("ray-head", args, env, {"requests": dict(head_res), "limits": dict(head_res)}, pvc_mounts)
    head["ports"] = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                     {"containerPort": 10001, "name": "client"}]
    # NCCL and Ray's object store use /dev/shm, which defaults to 64 MiB in a container.
    worker = _container("ray-worker", args, env, {"requests": dict(worker_res), "limits": dict(worker_res)},
                        [{"name": "dshm", "mountPath": "/dev/shm"}, *pvc_mounts])
    worker_pod: dict[str, Any] = {"containers": [worker],
                                  "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}, *volumes]}
    if args.gpus_per_worker:
        worker_pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    head_pod: dict[str, Any] = {"containers": [head]}
    if volumes:
        head_pod["volumes"] = volumes

    cluster: dict[str, Any] = {
        "rayVersion": args.ray_version or _ray_version(),
        "enableInTreeAutoscaling": False,
        **({"authOptions": {"mode": "token"}} if args.token_auth else {}),
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                          "template": {"spec": head_pod}},
        "workerGroupSpecs": [{"groupName": "gpu-workers" if args.gpus_per_worker else "cpu-workers",
                              "replicas": args.workers, "minReplicas": args.workers, "maxReplicas": args.workers,
                              "rayStartParams": {}, "template": {"spec": worker_pod}}],
    }
    spec: dict[str, Any] = {
        "entrypoint": " ".join(_shell_quote(a) for a in search),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": args.ttl_seconds,
        "backoffLimit": args.backoff_limit,
        "rayClusterSpec": cluster,
    }
    if args.active_deadline_seconds is not None:
        check(args.active_deadline_seconds > 0, "--active-deadline-seconds must be > 0")
        spec["activeDeadlineSeconds"] = args.active_deadline_seconds
    labels = {"app.kubernetes.io/name": "malora", "app.kubernetes.io/component": "search",
              "malora/space": re.sub(r"[^A-Za-z0-9._-]", "_", Path(space_rel).stem)[:63]}
    manifest = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob",
                "metadata": {"name": name, "namespace": args.namespace, "labels": labels}, "spec": spec}
    check_no_inline_secrets(manifest)
    return manifest


def _shell_quote(arg: str) -> str:
    return arg if re.fullmatch(r"[A-Za-z0-9_./:=@%+,-]+", arg) else "'" + arg.replace("'", "'\"'\"'") + "'"


def _ray_version() -> str:
    try:
        from importlib.metadata import version

        return version("ray")
    except Exception:  # noqa: BLE001 (ray not installed where we render)
        return "2.60.0"


def _containers(manifest: dict) -> list[dict]:
    cluster = manifest.get("spec", {}).get("rayClusterSpec", {})
    groups = [cluster.get("headGroupSpec", {}), *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g.get("template", {}).get("spec", {}).get("containers", [])]


def check_no_inline_secrets(manifest: dict) -> None:
    """Refuse a manifest whose containers carry a credential-like env var as a literal ``value``."""
    for c in _containers(manifest):
        for e in c.get("env", []):
            if "value" in e and SECRET_NAME.search(e.get("name", "")):
                raise ClusterError(f"container {c.get('name')}: env {e['name']} holds a literal value; reference a "
                                   "Secret (valueFrom.secretKeyRef) instead")


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # the head and worker share env lists: write them out twice
        return True


def to_yaml(manifest: dict) -> str:
    return yaml.dump(manifest, Dumper=_NoAliasDumper, sort_keys=False, width=1000)


# --------------------------------------------------------------------------------------------- the cluster
def custom_objects_api(context: str | None = None):
    """``kubernetes.client.CustomObjectsApi`` from the kubeconfig (or the in-cluster service account)."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise ClusterError("the kubernetes client is not installed: pip install 'malora[k8s]'") from None
    try:
        config.load_kube_config(context=context)
    except Exception as kube_exc:  # noqa: BLE001 (no kubeconfig: try the pod's service account)
        try:
            config.load_incluster_config()
        except Exception:  # noqa: BLE001
            raise ClusterError(f"no Kubernetes configuration: set KUBECONFIG or ~/.kube/config ({kube_exc})") from None
    return client.CustomObjectsApi()


def _api_error(exc: Exception, what: str) -> ClusterError:
    status, reason = getattr(exc, "status", None), getattr(exc, "reason", type(exc).__name__)
    if status == 404:
        return ClusterError(f"{what}: not found (is the KubeRay operator installed, and is this the namespace?)")
    if status == 409:
        return ClusterError(f"{what}: already exists; `{PROG} delete` it first or pass another --name")
    if status in (401, 403):
        return ClusterError(f"{what}: not allowed ({status} {reason}); check your kubeconfig user's RBAC rights")
    return ClusterError(f"{what}: {status or ''} {reason}".strip())


def apply(manifest: dict, api) -> dict:
    meta = manifest["metadata"]
    try:
        return api.create_namespaced_custom_object(GROUP, VERSION, meta.get("namespace", "default"), PLURAL, manifest)
    except Exception as exc:  # noqa: BLE001 (kubernetes.client.ApiException, urllib3 errors)
        raise _api_error(exc, f"RayJob {meta.get('namespace', 'default')}/{meta['name']}") from None


def status(name: str, namespace: str, api) -> dict:
    try:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except Exception as exc:  # noqa: BLE001
        raise _api_error(exc, f"RayJob {namespace}/{name}") from None
    st = obj.get("status", {})
    keys = ("jobStatus", "jobDeploymentStatus", "rayClusterName", "dashboardURL", "jobId", "startTime", "endTime",
            "failed", "succeeded", "reason", "message")
    return {k: st[k] for k in keys if k in st}


def delete(name: str, namespace: str, api) -> None:
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except Exception as exc:  # noqa: BLE001
        raise _api_error(exc, f"RayJob {namespace}/{name}") from None


def load_manifest(path: str) -> dict:
    try:
        manifest = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ClusterError(f"-f {path}: {exc}") from None
    check(isinstance(manifest, dict) and manifest.get("kind") == "RayJob"
           and manifest.get("apiVersion") == f"{GROUP}/{VERSION}", f"-f {path}: not a {GROUP}/{VERSION} RayJob")
    check_no_inline_secrets(manifest)
    return manifest
