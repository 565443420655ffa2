"""Helpers shared by everything that talks to an existing Ray cluster.

Three concerns live here, each a few pure functions so that the CLIs stay thin and the rules are unit-testable:

* **Token authentication (Ray >= 2.52).** A plain ``ray.init()`` on a fresh machine turns on token auth and writes
  ``~/.ray/auth_token``; every cluster started afterwards on that machine (``ray start --head``) enforces it, and a
  client that does not send ``Authorization: Bearer <token>`` gets HTTP 401. Ray looks for the token in
  ``RAY_AUTH_TOKEN`` (the value), then ``RAY_AUTH_TOKEN_PATH`` (a file), then ``~/.ray/auth_token``, and only sends
  it when ``RAY_AUTH_MODE=token`` (read once into Ray's C++ config, so setting the variable after ``import ray``
  has no effect). We resolve the token ourselves with the same precedence and hand the header to the client
  explicitly, which works whatever Ray's cached config says; :func:`ray_auth_env` gives child processes the
  ``RAY_AUTH_MODE`` they need. :func:`describe_auth_failure` turns Ray's multi-paragraph 401/403 error into one line.
* **Addresses.** The Jobs API lives on the dashboard (``http://HEAD:8265``), not on the GCS port or ``ray://``.
* **Storage.** Tune and Train write checkpoints and experiment state to ``storage_path``; on a multi-node cluster
  every node must reach the same location, so a path that exists on one machine only is refused
  (:func:`validate_storage_path`).

:class:`LocalRayNode` starts a Ray node on this machine in its own temp dir and ports and stops it by its process
group, never by ``ray stop`` (which kills every Ray process on the machine); tests and benchmarks use it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_DASHBOARD_PORT = 8265

#: Environment variable names that hold credentials: never given inline (job env vars show in the Ray dashboard,
#: manifest values in `kubectl get -o yaml`); they come from the nodes' environment or a Kubernetes Secret.
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|CREDENTIAL|API_KEY|PRIVATE_KEY", re.IGNORECASE)

#: URI schemes whose storage every node can reach (pyarrow / fsspec file systems Ray Tune accepts).
SHARED_SCHEMES = ("s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "hdfs", "viewfs")


class ClusterError(RuntimeError):
    """A problem the user fixes by changing a flag, a file or the environment; ``str()`` is one line."""


# --------------------------------------------------------------------------------------------- authentication
@dataclass(frozen=True)
class AuthToken:
    value: str = field(repr=False)  # never printed
    source: str  # e.g. "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH=/x/token", "~/.ray/auth_token"


def default_token_path() -> Path:
    """``~/.ray/auth_token``, resolved at call time (``HOME`` may change, e.g. in tests)."""
    return Path(os.path.expanduser("~")) / ".ray" / "auth_token"


def find_auth_token(environ: Mapping[str, str] | None = None) -> AuthToken | None:
    """The token Ray itself would use, with Ray's precedence; None when there is none.

    Raises ClusterError when ``RAY_AUTH_TOKEN_PATH`` is set but unreadable or empty (Ray aborts in that case too).
    """
    env = os.environ if environ is None else environ
    if env.get(AUTH_TOKEN_ENV, "").strip():
        return AuthToken(env[AUTH_TOKEN_ENV].strip(), AUTH_TOKEN_ENV)
    if env.get(AUTH_TOKEN_PATH_ENV):
        path = Path(env[AUTH_TOKEN_PATH_ENV]).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ClusterError(f"{AUTH_TOKEN_PATH_ENV}={path} cannot be read ({exc.strerror}): point it at the "
                               "cluster's token file or unset it") from None
        if not value:
            raise ClusterError(f"{AUTH_TOKEN_PATH_ENV}={path} is empty: point it at the cluster's token file")
        return AuthToken(value, f"{AUTH_TOKEN_PATH_ENV}={path}")
    path = default_token_path()
    if path.is_file():
        value = path.read_text().strip()
        if value:
            return AuthToken(value, str(path))
    return None


def auth_disabled(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(AUTH_MODE_ENV, "").lower() == "disabled"


def ray_auth_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables a Ray client process needs: ``{"RAY_AUTH_MODE": "token"}`` when a token is available
    and the mode is unset, else ``{}`` (an explicit ``RAY_AUTH_MODE`` is always respected).

    The token itself is never copied into the result: Ray reads it from the same variable or file we found it in.
    Apply it before ``import ray`` (Ray caches the mode at import).
    """
    env = os.environ if environ is None else environ
    if env.get(AUTH_MODE_ENV):
        return {}
    return {AUTH_MODE_ENV: "token"} if find_auth_token(env) is not None else {}


def auth_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` for the dashboard's HTTP API, or ``{}`` (no token, or mode disabled).

    Sending a token to a cluster without auth is harmless: its middleware ignores the header.
    """
    if auth_disabled(environ):
        return {}
    token = find_auth_token(environ)
    return {"Authorization": f"Bearer {token.value}"} if token else {}


def describe_auth_failure(message: str, address: str, environ: Mapping[str, str] | None = None) -> str:
    """One line for an HTTP 401/403 from the dashboard (``message`` is Ray's error text)."""
    how = (f"set {AUTH_TOKEN_ENV} to the cluster's token, or {AUTH_TOKEN_PATH_ENV} to a file holding it "
           f"(`ray get-auth-token` on the head prints it; {default_token_path()} is used by default)")
    if auth_disabled(environ):
        return f"the Ray cluster at {address} requires token authentication but {AUTH_MODE_ENV}=disabled: unset it and {how}"
    if "Forbidden" in message or "invalid" in message.lower():
        token = find_auth_token(environ)
        source = token.source if token else "the request"
        return f"the Ray cluster at {address} rejected the token from {source}: {how}"
    return f"the Ray cluster at {address} requires token authentication and no token was found: {how}"


# --------------------------------------------------------------------------------------------------- addresses
def normalize_dashboard_address(address: str) -> str:
    """``HOST``, ``HOST:PORT`` or ``http(s)://HOST[:PORT]`` -> ``http(s)://HOST:PORT`` of the Jobs API.

    >>> normalize_dashboard_address("10.0.0.5")
    'http://10.0.0.5:8265'
    """
    address = address.strip().rstrip("/")
    if not address:
        raise ClusterError("--address is empty: give the Ray dashboard URL, e.g. http://HEAD:8265")
    if address.startswith("ray://"):
        raise ClusterError(f"--address {address} is a Ray Client address; jobs are submitted to the dashboard: "
                           f"use http://HOST:{DEFAULT_DASHBOARD_PORT}")
    if address == "auto":
        raise ClusterError("--address auto cannot locate a dashboard: give http://HEAD:8265 (or set RAY_ADDRESS to it)")
    if "://" not in address:
        address = "http://" + address
    scheme, rest = address.split("://", 1)
    if scheme not in ("http", "https"):
        raise ClusterError(f"--address {address}: scheme must be http or https (the Ray dashboard URL)")
    host = rest.split("/", 1)[0]
    if ":" not in host.rsplit("]", 1)[-1]:
        address = f"{scheme}://{host}:{DEFAULT_DASHBOARD_PORT}" + rest[len(host):]
    return address


def alive_nodes(dashboard_url: str, headers: Mapping[str, str] | None = None, timeout: float = 10.0) -> list[dict]:
    """The ALIVE nodes of a cluster from the State API (``GET /api/v0/nodes``; needs ``ray[default]`` on the head)."""
    request = urllib.request.Request(f"{dashboard_url}/api/v0/nodes?limit=10000", headers=dict(headers or {}))
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (user-given dashboard URL)
        payload = json.load(response)
    nodes = payload["data"]["result"]["result"]
    return [n for n in nodes if n.get("state") == "ALIVE"]


# ----------------------------------------------------------------------------------------------------- storage
def split_uri(value: str) -> tuple[str | None, str]:
    """``"s3://b/p"`` -> ``("s3", "b/p")``; a plain path -> ``(None, path)``."""
    if "://" in value:
        scheme, rest = value.split("://", 1)
        if scheme and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
            return scheme.lower(), rest
    return None, value


def _has_userinfo(rest: str) -> bool:
    """``user:secret@host`` in a URI's authority (``container@account`` of abfss:// has no ':' and is fine)."""
    authority = rest.split("/", 1)[0]
    return "@" in authority and ":" in authority.rsplit("@", 1)[0]


def _under(path: str, roots: Sequence[str]) -> bool:
    p = PurePosixPath(os.path.normpath(path))
    return any(p == PurePosixPath(os.path.normpath(r)) or PurePosixPath(os.path.normpath(r)) in p.parents
               for r in roots)


def validate_storage_path(path: str, multi_node: bool, *, shared_fs: Sequence[str] = (),
                          allow_relative: bool = True, flag: str = "--storage-path",
                          shared_flag: str = "--shared-fs MOUNT") -> str:
    """Check that every Ray node can reach ``path``; return it normalised (absolute path or URI).

    * ``s3://``, ``gs://``, ``abfss://``, ``hdfs://`` ... : reachable from every node; returned unchanged.
    * ``file:///abs`` or ``/abs``: one machine's disk. Accepted on a single-node cluster; on a multi-node cluster
      only under a mount that every node shares (``shared_fs``, e.g. ``/mnt/nfs``), otherwise each node would
      write checkpoints into its own private directory and resume would see a fraction of them.
    * a relative path (or ``~``): resolved here when ``allow_relative`` (a local run); refused otherwise, because a
      submitted job's working directory is a temporary copy that vanishes with the job.
    """
    if not path or not path.strip():
        raise ClusterError(f"{flag} is empty: give a URI (s3://bucket/prefix) or an absolute path")
    scheme, rest = split_uri(path.strip())
    if scheme is not None and scheme != "file":
        if scheme not in SHARED_SCHEMES:
            raise ClusterError(f"{flag} {path}: unsupported scheme '{scheme}://'; use one of "
                               + ", ".join(f"{s}://" for s in SHARED_SCHEMES) + " or an absolute path")
        if _has_userinfo(rest):
            raise ClusterError(f"{flag} {path}: credentials in the URI would be logged; give them to the nodes "
                               "through the environment (e.g. AWS_ACCESS_KEY_ID) instead")
        if not rest.strip("/"):
            raise ClusterError(f"{flag} {path}: the URI names no bucket or container")
        return path.strip()
    local = rest if scheme == "file" else path.strip()
    if not os.path.isabs(local):
        if not allow_relative:
            raise ClusterError(f"{flag} {path} is relative: on the cluster it would resolve inside the job's "
                               "temporary working directory; give an absolute path or a URI (s3://bucket/prefix)")
        local = os.path.abspath(os.path.expanduser(local))
    local = os.path.normpath(local)
    if multi_node and not _under(local, shared_fs):
        declared = f" (declared shared: {', '.join(shared_fs)})" if shared_fs else ""
        raise ClusterError(
            f"{flag} {path} is a local path but the cluster has several nodes, which would each write to their own "
            f"disk{declared}: use a URI every node reaches (s3://bucket/prefix, gs://..., abfss://...) or a path on a "
            f"file system mounted on every node and declare it with {shared_flag}")
    return local


def validate_tracking_uri(uri: str | None, multi_node: bool, *, shared_fs: Sequence[str] = (),
                          flag: str = "--tracking-uri", shared_flag: str = "--shared-fs MOUNT") -> str:
    """An MLflow tracking URI that outlives a submitted job and that every trial can write to."""
    if not uri:
        raise ClusterError(f"a submitted search needs an MLflow store that outlives the job: pass {flag} "
                           "http://MLFLOW:5000 (or sqlite:////ABS/PATH/mlflow.db on a single-node cluster), or set "
                           "MLFLOW_TRACKING_URI")
    if uri.split("://", 1)[0] in ("databricks", "databricks-uc"):  # a profile name, not a path
        return uri
    scheme, rest = split_uri(uri)
    if scheme in ("http", "https"):
        if _has_userinfo(rest):
            raise ClusterError(f"{flag} {uri}: credentials in the URI would show in the Ray dashboard; set "
                               "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD on the cluster nodes instead")
        return uri
    if scheme == "sqlite":  # sqlite:///rel.db (relative) or sqlite:////abs.db (absolute)
        db_path = rest[1:] if rest.startswith("/") else rest
        validate_storage_path(db_path, multi_node, shared_fs=shared_fs, allow_relative=False,
                              flag=f"{flag} {uri}: database", shared_flag=shared_flag)
        return uri
    if scheme not in (None, "file"):
        return uri  # another MLflow backend (postgresql://, mysql://...): reachable by design
    validate_storage_path(uri, multi_node, shared_fs=shared_fs, allow_relative=False, flag=flag,
                          shared_flag=shared_flag)
    return uri


# ------------------------------------------------------------------------------------------ local Ray nodes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_range(size: int) -> int:
    """Start of ``size`` consecutive free ports in 20000-32000 (below Linux's ephemeral range, above Ray's default)."""
    for _ in range(50):
        base = random.randrange(20000, 32000 - size)
        try:
            for port in (base, base + size // 2, base + size - 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise ClusterError("no free worker port range found in 20000-32000")


@dataclass
class LocalRayNode:
    """A ``ray start --block`` process (head or worker) in its own session, temp dir and process group."""

    process: subprocess.Popen
    temp_dir: Path
    log_path: Path
    gcs_address: str | None = None
    dashboard_url: str | None = None

    @classmethod
    def start(cls, *, head_address: str | None = None, num_cpus: int = 1, resources: Mapping[str, float] | None = None,
              env: Mapping[str, str] | None = None) -> LocalRayNode:
        """Start a head (``head_address=None``) or a worker joining ``head_address`` (GCS ``host:port``)."""
        temp_dir = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))  # short: unix socket paths are <= 107 chars
        ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
                 "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
        base = _free_port_range(100)
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--num-cpus", str(num_cpus),
               "--temp-dir", str(temp_dir), "--disable-usage-stats",
               "--min-worker-port", str(base), "--max-worker-port", str(base + 99)]
        cmd += [str(x) for kv in ports.items() for x in kv]
        if resources:
            cmd += ["--resources", json.dumps(dict(resources))]
        gcs = dashboard = None
        if head_address is None:
            gcs_port, dash_port = free_port(), free_port()
            cmd += ["--head", "--port", str(gcs_port), "--node-ip-address", "127.0.0.1",
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
                    "--ray-client-server-port", str(free_port())]
            gcs, dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}"
        else:
            cmd += ["--address", head_address, "--node-ip-address", "127.0.0.1"]
        child_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
        # Ray processes that call the State API without an address (Train's PlacementGroupCleaner does) auto-detect
        # the cluster and fail with "Found multiple active Ray instances" when another one runs on this machine.
        if dashboard:
            child_env["RAY_API_SERVER_ADDRESS"] = dashboard
        else:
            child_env["RAY_ADDRESS"] = head_address
        # The job entrypoint runs `python ...`: make it this interpreter's environment.
        child_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{child_env.get('PATH', '')}"
        log_path = temp_dir / "node.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
        return cls(proc, temp_dir, log_path, gcs, dashboard)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_for_nodes(self, count: int, headers: Mapping[str, str] | None = None, timeout: float = 120.0) -> None:
        """Block until the dashboard (of this head) lists ``count`` ALIVE nodes."""
        assert self.dashboard_url, "wait_for_nodes is called on the head"
        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if len(alive_nodes(self.dashboard_url, headers, timeout=5)) >= count:
                    return
                last = "too few nodes"
            except (OSError, urllib.error.URLError, KeyError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise RuntimeError(f"cluster at {self.dashboard_url} did not reach {count} nodes in {timeout:.0f}s "
                           f"({last}):\n{self.log_tail()}")

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the node's process group and its workers (which run in their own groups), SIGKILL what is left."""
        try:
            import psutil

            workers = [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]
        except Exception:  # noqa: BLE001 (already gone, or psutil missing: the group kill still runs)
            workers = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for kill, pid in [(os.killpg, self.process.pid)] + [(os.kill, pid) for pid in workers]:
                try:
                    kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            if sig == signal.SIGTERM:
                try:
                    self.process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
