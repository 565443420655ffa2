"""orchestrator.submit and orchestrator.cluster.ray_cluster: pure rules (fast) and real Ray jobs on a local head (ray, slow).

The real head runs with token authentication on (``RAY_AUTH_MODE=token``, its own token file), as every cluster
started on a machine where ``ray.init()`` once ran does; the client finds the token through ``RAY_AUTH_TOKEN_PATH``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator import submit
from orchestrator.cluster import jobs as ray_jobs, ray_cluster
from orchestrator.cluster.ray_cluster import ClusterError, LocalRayNode

REPO = Path(__file__).resolve().parents[2]
SMOKE = "search_spaces/smoke.yaml"


@pytest.fixture
def clean_auth_env(monkeypatch, tmp_path):
    """No token anywhere: no auth env vars, and HOME without ~/.ray/auth_token."""
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


# ------------------------------------------------------------------------------------------------ auth
def test_token_precedence_matches_ray(clean_auth_env, tmp_path, monkeypatch):
    assert ray_cluster.find_auth_token() is None and ray_cluster.ray_auth_env() == {}
    (clean_auth_env / ".ray").mkdir()
    (clean_auth_env / ".ray" / "auth_token").write_text("from-home\n")
    assert ray_cluster.find_auth_token().value == "from-home"
    token_file = tmp_path / "tok"
    token_file.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert ray_cluster.find_auth_token().value == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    token = ray_cluster.find_auth_token()
    assert (token.value, token.source) == ("from-env", "RAY_AUTH_TOKEN")
    assert "from-env" not in repr(token)  # never printed
    assert ray_cluster.auth_headers() == {"Authorization": "Bearer from-env"}
    assert ray_cluster.ray_auth_env() == {"RAY_AUTH_MODE": "token"}


def test_explicit_auth_mode_is_respected(clean_auth_env, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_cluster.auth_headers() == {} and ray_cluster.ray_auth_env() == {}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert ray_cluster.auth_headers() == {"Authorization": "Bearer t"} and ray_cluster.ray_auth_env() == {}


def test_unreadable_token_path_is_one_clear_error(clean_auth_env, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH=.*missing cannot be read"):
        ray_cluster.find_auth_token()
    (tmp_path / "empty").write_text("  \n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "empty"))
    with pytest.raises(ClusterError, match="is empty"):
        ray_cluster.auth_headers()


def test_auth_failure_messages_name_the_fix(clean_auth_env, monkeypatch):
    missing = ray_cluster.describe_auth_failure("Authentication required: Unauthorized", "http://h:8265")
    assert "no token was found" in missing and "RAY_AUTH_TOKEN" in missing and "RAY_AUTH_TOKEN_PATH" in missing
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
    rejected = ray_cluster.describe_auth_failure("Authentication failed: Forbidden: Invalid", "http://h:8265")
    assert "rejected the token from RAY_AUTH_TOKEN" in rejected and "wrong" not in rejected
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert "RAY_AUTH_MODE=disabled" in ray_cluster.describe_auth_failure("Unauthorized", "http://h:8265")
    assert all("\n" not in m for m in (missing, rejected))


# ------------------------------------------------------------------------------------------- addresses
@pytest.mark.parametrize("given, expected", [
    ("10.0.0.5", "http://10.0.0.5:8265"),
    ("head.svc:8266", "http://head.svc:8266"),
    ("http://head:8265/", "http://head:8265"),
    ("https://ray.example.com", "https://ray.example.com:8265"),
    ("https://ray.example.com:443/proxy", "https://ray.example.com:443/proxy"),
])
def test_normalize_dashboard_address(given, expected):
    assert ray_cluster.normalize_dashboard_address(given) == expected


@pytest.mark.parametrize("given, message", [("ray://head:10001", "Ray Client"), ("auto", "cannot locate"),
                                             ("grpc://head:1", "http or https"), ("  ", "empty")])
def test_bad_dashboard_address(given, message):
    with pytest.raises(ClusterError, match=message):
        ray_cluster.normalize_dashboard_address(given)


# --------------------------------------------------------------------------------------------- storage
@pytest.mark.parametrize("path, multi, shared, expected", [
    ("s3://bucket/malora", True, (), "s3://bucket/malora"),
    ("gs://bucket/p", True, (), "gs://bucket/p"),
    ("abfss://container@account.dfs.core.windows.net/p", True, (), "abfss://container@account.dfs.core.windows.net/p"),
    ("/data/runs", False, (), "/data/runs"),
    ("file:///data/runs/", False, (), "/data/runs"),
    ("/mnt/nfs/runs", True, ("/mnt/nfs",), "/mnt/nfs/runs"),
    ("/mnt/nfs", True, ("/mnt/nfs/",), "/mnt/nfs"),
])
def test_storage_path_accepted(path, multi, shared, expected):
    assert ray_cluster.validate_storage_path(path, multi, shared_fs=shared, allow_relative=False) == expected


@pytest.mark.parametrize("path, multi, shared, message", [
    ("/data/runs", True, (), "local path but the cluster has several nodes"),
    ("file:///data/runs", True, (), "local path"),
    ("/mnt/nfs2/runs", True, ("/mnt/nfs",), "declared shared: /mnt/nfs"),
    ("runs", False, (), "relative"),
    ("~/runs", False, (), "relative"),
    ("ftp://host/runs", True, (), "unsupported scheme"),
    ("s3://KEY:SECRET@bucket/p", True, (), "credentials"),
    ("s3://", True, (), "no bucket"),
    ("", False, (), "empty"),
])
def test_storage_path_refused(path, multi, shared, message):
    with pytest.raises(ClusterError, match=message):
        ray_cluster.validate_storage_path(path, multi, shared_fs=shared, allow_relative=False)


def test_relative_storage_resolved_for_local_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ray_cluster.validate_storage_path("runs", multi_node=False) == str(tmp_path / "runs")


@pytest.mark.parametrize("uri, multi, ok", [
    ("http://mlflow:5000", True, True), ("databricks", True, True), ("postgresql://db/mlflow", True, True),
    ("sqlite:////abs/mlflow.db", False, True), ("sqlite:////abs/mlflow.db", True, False),
    ("sqlite:///mlflow.db", False, False), ("mlruns", False, False), ("https://u:p@mlflow", False, False),
    (None, False, False),
])
def test_tracking_uri_rules(uri, multi, ok):
    if ok:
        assert ray_cluster.validate_tracking_uri(uri, multi) == uri
    else:
        with pytest.raises(ClusterError):
            ray_cluster.validate_tracking_uri(uri, multi)


# ----------------------------------------------------------------------------------- the submitted job
def _args(*extra: str) -> argparse.Namespace:
    return submit.build_parser().parse_args(["submit", "--space", SMOKE, "--storage-path", "/srv/runs",
                                             "--tracking-uri", "http://mlflow:5000", *extra])


def test_job_forwards_search_arguments_and_environment(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MY_FLAG", "from-shell")
    monkeypatch.delenv("MALORA_DATA_DIR", raising=False)
    args = _args("--experiment", "exp1", "--num-trials", "3", "--smoke-test", "--resume", "--data-dir", "/data",
                 "--env", "A=1", "--env", "MY_FLAG")
    job = ray_jobs.build_job(args, ["--name", "x y"], multi_node=False)
    assert shlex.split(job["entrypoint"]) == [
        "python", "-m", "orchestrator.search", "--space", SMOKE, "--address", "auto", "--storage-path", "/srv/runs",
        "--tracking-uri", "http://mlflow:5000", "--experiment", "exp1", "--num-trials", "3", "--smoke-test",
        "--resume", "--name", "x y"]
    env = job["runtime_env"]["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["MALORA_STORAGE_PATH"] == "/srv/runs"
    assert (env["HF_HUB_OFFLINE"], env["MALORA_DATA_DIR"], env["A"], env["MY_FLAG"]) == ("1", "/data", "1", "from-shell")
    assert job["runtime_env"]["working_dir"] == str(REPO)
    assert {".venv", ".git", "mlruns", "mlartifacts", "*.db"} <= set(job["runtime_env"]["excludes"])
    assert job["submission_id"].startswith("malora-exp1-")


def test_local_storage_inside_project_is_not_uploaded():
    job = ray_jobs.build_job(_args("--storage-path", str(REPO / "results" / "run1")), [], multi_node=False)
    assert "/results/run1" in job["runtime_env"]["excludes"]


def test_submission_id_is_stable_and_ignores_resume():
    base = ray_jobs.build_job(_args(), [], multi_node=False)["submission_id"]
    assert base == ray_jobs.build_job(_args(), [], multi_node=False)["submission_id"]
    assert base == ray_jobs.build_job(_args("--resume"), [], multi_node=False)["submission_id"]
    assert base != ray_jobs.build_job(_args("--num-trials", "9"), [], multi_node=False)["submission_id"]
    assert base != ray_jobs.build_job(_args("--storage-path", "s3://b/p"), [], multi_node=False)["submission_id"]
    assert ray_jobs.build_job(_args("--submission-id", "mine"), [], multi_node=False)["submission_id"] == "mine"
    a = ray_jobs.derive_submission_id(b"space: 1", "My Space!", "/s", ["--x"])
    assert a != ray_jobs.derive_submission_id(b"space: 2", "My Space!", "/s", ["--x"])
    assert a.startswith("malora-my-space-") and len(a.rsplit("-", 1)[1]) == 8


@pytest.mark.parametrize("extra, message", [
    (["--storage-path", "runs"], "relative"),
    (["--storage-path", "/srv/runs", "--multi-node"], "several nodes"),
    (["--tracking-uri", "sqlite:///mlflow.db"], "relative"),
    (["--env", "AWS_SECRET_ACCESS_KEY=x"], "credential"),
    (["--env", "NOT_SET_ANYWHERE_42"], "not set in this shell"),
    (["--space", "OUTSIDE"], "outside the uploaded project"),
    (["--space", "search_spaces/none.yaml"], "no such file"),
])
def test_bad_submit_input_is_one_line_exit_2(extra, message, capsys, tmp_path):
    outside = tmp_path / "space.yaml"  # a file outside the project
    outside.write_text("name: x\n")
    extra = [str(outside) if a == "OUTSIDE" else a for a in extra]
    argv = ["--space", SMOKE, "--storage-path", "/srv/runs", "--tracking-uri", "http://m:5000", "--dry-run", *extra]
    assert submit.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_shared_fs_accepts_multi_node_local_path_and_dry_run_prints_plan(capsys):
    argv = ["--space", SMOKE, "--storage-path", "/mnt/nfs/runs", "--tracking-uri", "http://m:5000", "--multi-node",
            "--shared-fs", "/mnt/nfs", "--dry-run", "--", "--name", "n1"]
    assert submit.main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["multi_node"] is True and plan["entrypoint"].endswith("--name n1")


def test_missing_tracking_uri_and_address(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert submit.main(["--space", SMOKE, "--storage-path", "/srv/r", "--dry-run"]) == 2
    assert "--tracking-uri" in capsys.readouterr().err
    for key in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    assert submit.main(["status", "x"]) == 2
    assert "--address" in capsys.readouterr().err


class _Status:
    def __init__(self, value):
        self.value = value

    def is_terminal(self):
        return self.value in ("SUCCEEDED", "FAILED", "STOPPED")


class FakeJobs:
    """The JobSubmissionClient calls submit uses, over a dict of submission id -> status."""

    def __init__(self, jobs, logs=("line 1\n", "line 2\n")):
        self.jobs, self.logs = dict(jobs), logs

    def get_job_info(self, sid):
        if sid not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {sid} does not exist.")
        return argparse.Namespace(status=_Status(self.jobs[sid]), message="done")

    async def tail_job_logs(self, sid):
        for chunk in self.logs:
            yield chunk
        if self.jobs[sid] == "RUNNING":  # a job that never ends on its own
            await asyncio.sleep(3600)

    def stop_job(self, sid):
        self.jobs[sid] = "STOPPED"
        return True


def test_resubmission_suffixes_finished_and_refuses_running():
    assert ray_jobs.choose_submission_id(FakeJobs({}), "malora-a-1", "http://h:8265") == "malora-a-1"
    done = FakeJobs({"malora-a-1": "SUCCEEDED", "malora-a-1-2": "FAILED"})
    assert ray_jobs.choose_submission_id(done, "malora-a-1", "http://h:8265") == "malora-a-1-3"
    running = FakeJobs({"malora-a-1": "STOPPED", "malora-a-1-2": "RUNNING"})
    with pytest.raises(ClusterError, match=r"malora-a-1-2 is already RUNNING.*logs malora-a-1-2 --follow.*stop"):
        ray_jobs.choose_submission_id(running, "malora-a-1", "http://h:8265")


@pytest.mark.parametrize("final, code", [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_follow_streams_logs_and_maps_status(final, code, capsys):
    assert ray_jobs.follow(FakeJobs({"j": final}), "j", poll_s=0) == code
    captured = capsys.readouterr()
    assert captured.out == "line 1\nline 2\n" and f"finished: {final}" in captured.err


def test_follow_timeout_stops_the_job(capsys):
    jobs = FakeJobs({"j": "RUNNING"})
    t0 = time.monotonic()
    assert ray_jobs.follow(jobs, "j", poll_s=0, timeout=0.3) == 1
    assert time.monotonic() - t0 < 5 and jobs.jobs["j"] == "STOPPED"
    err = capsys.readouterr().err
    assert "ran past --timeout 0.3s: stopping it" in err and "finished: STOPPED" in err


# ----------------------------------------------------------------------------------- real Ray cluster
@contextlib.contextmanager
def sigterm_as_interrupt():
    """Let pytest run fixture finalisers (stopping the Ray nodes) when it is terminated, e.g. by `timeout`."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A token-auth Ray head on 127.0.0.1 with its own temp dir and ports; stopped by process group."""
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text("test-token-" + os.urandom(8).hex())
    with sigterm_as_interrupt():
        node = LocalRayNode.start(num_cpus=2, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)})
        try:
            node.wait_for_nodes(1, headers={"Authorization": f"Bearer {token_file.read_text()}"}, timeout=120)
            node.token_file = token_file
            yield node
        finally:
            node.stop()


@pytest.fixture
def token_env(head, clean_auth_env, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_file))
    return head


FAKE_SEARCH = textwrap.dedent(
    """
    import json, os, sys
    args = sys.argv[1:]
    out = args[args.index("--storage-path") + 1]
    os.makedirs(out, exist_ok=True)
    keys = ("MLFLOW_TRACKING_URI", "MALORA_STORAGE_PATH", "MALORA_DATA_DIR", "EXTRA")
    with open(os.path.join(out, "call.json"), "w") as f:
        json.dump({"argv": args, "env": {k: os.environ.get(k) for k in keys}, "cwd_files": sorted(os.listdir("."))}, f)
    print("fake search ran", flush=True)
    sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
    """
)


@pytest.fixture
def fake_project(tmp_path):
    """A project folder whose orchestrator.search only records how it was called (a job of a few seconds)."""
    root = tmp_path / "proj"
    (root / "orchestrator").mkdir(parents=True)
    (root / "orchestrator" / "__init__.py").write_text("")
    (root / "orchestrator" / "search.py").write_text(FAKE_SEARCH)
    (root / "search_spaces").mkdir()
    (root / "search_spaces" / "s.yaml").write_text("name: s\n")
    (root / "mlflow.db").write_text("must not be uploaded")
    return root


def _fake_submit(head, root, storage, *extra):
    return ["--address", head.dashboard_url, "--working-dir", str(root), "--space", str(root / "search_spaces/s.yaml"),
            "--storage-path", str(storage), "--tracking-uri", "http://mlflow.invalid:5000", *extra]


@pytest.mark.ray
@pytest.mark.slow
def test_without_token_the_user_gets_one_line(head, clean_auth_env, capsys, monkeypatch):
    assert submit.main(["status", "nope", "--address", head.dashboard_url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "requires token authentication" in err and "RAY_AUTH_TOKEN_PATH" in err
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong-token")
    assert submit.main(["list", "--address", head.dashboard_url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rejected the token from RAY_AUTH_TOKEN" in err and "wrong-token" not in err


@pytest.mark.ray
@pytest.mark.slow
def test_job_lifecycle_on_real_cluster(token_env, fake_project, tmp_path, capsys):
    storage = tmp_path / "storage"
    argv = _fake_submit(token_env, fake_project, storage, "--env", "EXTRA=yes", "--data-dir", "/data")
    assert submit.main([*argv, "--", "--name", "n 1"]) == 0
    captured = capsys.readouterr()
    assert "fake search ran" in captured.out and "finished: SUCCEEDED" in captured.err
    first = captured.err.split("submitted ", 1)[1].split()[0]
    assert first.startswith("malora-s-")
    call = json.loads((storage / "call.json").read_text())
    assert call["argv"][:4] == ["--space", "search_spaces/s.yaml", "--address", "auto"]
    assert call["argv"][-2:] == ["--name", "n 1"]
    assert call["env"] == {"MLFLOW_TRACKING_URI": "http://mlflow.invalid:5000", "MALORA_STORAGE_PATH": str(storage),
                           "MALORA_DATA_DIR": "/data", "EXTRA": "yes"}
    assert "orchestrator" in call["cwd_files"] and "mlflow.db" not in call["cwd_files"]

    # same search again (env vars are not part of the id): the finished id gets a suffix; --no-wait returns at once
    assert submit.main([*argv, "--env", "FAKE_EXIT=3", "--no-wait", "--", "--name", "n 1"]) == 0
    second = capsys.readouterr().out.strip()
    assert second == f"{first}-2"
    assert submit.main(["logs", second, "--follow", "--address", token_env.dashboard_url]) == 1  # exit 3 -> FAILED
    assert "finished: FAILED" in capsys.readouterr().err
    assert submit.main(["status", second, "--address", token_env.dashboard_url]) == 0
    assert capsys.readouterr().out.startswith(f"{second}: FAILED")
    assert submit.main(["list", "--address", token_env.dashboard_url]) == 0
    listed = capsys.readouterr().out
    assert f"{first}\tSUCCEEDED" in listed and f"{second}\tFAILED" in listed
    assert submit.main(["status", "no-such-job", "--address", token_env.dashboard_url]) == 2


@pytest.mark.ray
@pytest.mark.slow
def test_running_submission_is_not_resubmitted_and_can_be_stopped(token_env, fake_project, tmp_path, capsys):
    (fake_project / "orchestrator" / "search.py").write_text("import time\nprint('sleeping', flush=True)\ntime.sleep(300)\n")
    argv = _fake_submit(token_env, fake_project, tmp_path / "st")
    assert submit.main([*argv, "--no-wait"]) == 0
    sid = capsys.readouterr().out.strip()
    assert submit.main([*argv, "--no-wait"]) == 2
    assert f"{sid} is already" in capsys.readouterr().err
    assert submit.main(["stop", sid, "--address", token_env.dashboard_url]) == 0
    assert "stop requested" in capsys.readouterr().out
    assert submit.main(["logs", sid, "--follow", "--address", token_env.dashboard_url]) == 1
    assert "finished: STOPPED" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_submit_smoke_search(token_env, shared_data_dir, tmp_path, capsys, monkeypatch):
    """Acceptance: the real smoke search (2 trials, tiny model) as a Ray job; MLflow holds what it produced."""
    if not (REPO / "orchestrator" / "search.py").is_file():
        pytest.skip("orchestrator/search.py is not there yet")
    db = tmp_path / "mlflow.db"
    experiment = f"submit-smoke-{os.getpid()}"
    t0 = time.monotonic()
    code = submit.main(["--address", token_env.dashboard_url, "--space", SMOKE, "--storage-path",
                        str(tmp_path / "storage"), "--tracking-uri", f"sqlite:///{db}", "--experiment", experiment,
                        "--data-dir", str(shared_data_dir), "--timeout", "300"])
    captured = capsys.readouterr()
    assert code == 0, f"job failed after {time.monotonic() - t0:.0f}s:\n{captured.out[-6000:]}\n{captured.err[-2000:]}"
    assert "finished: SUCCEEDED" in captured.err

    import mlflow

    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)  # restored after the test
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.params["method"] for r in children) == ["lora", "malora"]
    for r in children:
        assert int(r.data.params["trainable_params"]) > 0
        per_task = sorted(k for k in r.data.metrics if k.startswith("val/acc/"))
        assert len(per_task) == 2 and "val/acc/boolq" in per_task and "val/mean_acc" in r.data.metrics  # boolq + ARC-Easy
        assert 0.0 <= r.data.metrics["val/mean_acc"] <= 1.0
    assert (tmp_path / "storage").is_dir()
