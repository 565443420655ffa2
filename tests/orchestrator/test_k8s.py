"""RayJob rendering: manifests validate against KubeRay's CRD schema, carry no secret values, refuse local storage;
apply/status/delete go through the CustomObjectsApi (a fake here)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator import k8s
from orchestrator.cluster import kuberay

REPO = Path(__file__).resolve().parents[2]
CRD = REPO.parent / "shared" / "kuberay" / "ray.io_rayjobs.yaml"
SPACE = "search_spaces/smoke.yaml"
BASE = ["--space", SPACE, "--image", "registry.example/malora:0.1", "--storage-path", "s3://bucket/malora",
        "--mlflow-uri", "http://mlflow.mlflow.svc:5000"]

#: option combinations: (extra argv, expected workers, expected GPUs per worker)
COMBOS = {
    "minimal": ([], 1, 1),
    "gpus-secrets-auth": (["--workers", "4", "--gpus-per-worker", "8", "--cpus-per-worker", "31500m",
                           "--memory-per-worker", "240Gi", "--namespace", "research", "--name", "mal-intra",
                           "--secret", "aws-creds:AWS_ACCESS_KEY_ID", "--secret", "aws-creds:AWS_SECRET_ACCESS_KEY",
                           "--secret", "mlflow-auth:token=MLFLOW_TRACKING_TOKEN", "--token-auth",
                           "--active-deadline-seconds", "86400", "--experiment", "intra", "--num-trials", "64",
                           "--backoff-limit", "5", "--ttl-seconds", "600"], 4, 8),
    "cpu-pvc": (["--workers", "2", "--gpus-per-worker", "0", "--pvc", "shared-rwx:/mnt/shared",
                 "--storage-path", "/mnt/shared/runs", "--mlflow-uri", "sqlite:////mnt/shared/mlflow.db",
                 "--env", "HF_HUB_OFFLINE=1", "--data-dir", "/mnt/shared/data", "--smoke-test"], 2, 0),
    "gcs-abfss": (["--storage-path", "gs://bucket/prefix", "--workdir", "/opt/malora", "--ray-version", "2.60.0",
                   "--secret", "gcp:key.json=GOOGLE_APPLICATION_CREDENTIALS_JSON"], 1, 1),
}
FAKE_SECRETS = {"AWS_SECRET_ACCESS_KEY": "fake-aws-SECRET-7f3kq", "AWS_ACCESS_KEY_ID": "AKIAFAKEKEY000111",
                "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-x9z", "MLFLOW_TRACKING_PASSWORD": "fake-pw-55aa",
                "RAY_AUTH_TOKEN": "fake-ray-token-c0ffee", "HF_TOKEN": "hf_fakefakefake123"}


def render(argv: list[str]) -> dict:
    args = k8s.build_parser().parse_args(["render", *argv])
    return kuberay.render_rayjob(args)


def _strict(schema):
    """The CRD schema with unknown fields forbidden, so a misspelt field fails instead of being pruned."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validator():
    if not CRD.is_file():
        pytest.skip(f"KubeRay CRD not found at {CRD} (the read-only ../shared/kuberay folder)")
    jsonschema = pytest.importorskip("jsonschema")
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_rendered_manifest_validates_against_crd(combo, validator):
    extra, workers, gpus = COMBOS[combo]
    manifest = yaml.safe_load(kuberay.to_yaml(render(BASE + extra)))  # what `render` prints, read back
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    assert errors == []
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"] == {"num-cpus": "0", "dashboard-host": "0.0.0.0"}
    (head_c,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head_c["resources"]["limits"]
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == workers
    (worker_c,) = group["template"]["spec"]["containers"]
    assert worker_c["resources"]["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    assert worker_c["resources"]["requests"] == worker_c["resources"]["limits"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "orchestrator.search"] and "--resume" in argv
    given = BASE + extra
    expected_storage = [v for k, v in zip(given, given[1:]) if k == "--storage-path"][-1]  # argparse: last wins
    assert argv[argv.index("--storage-path") + 1] == expected_storage
    assert argv[argv.index("--space") + 1].endswith("/" + SPACE)


def test_strict_schema_rejects_misspelt_and_mistyped_fields(validator):
    manifest = render(BASE)
    manifest["spec"]["shutdownAfterJobFinish"] = True  # misspelt: the API server would silently prune it
    manifest["spec"]["backoffLimit"] = "2"
    paths = sorted("/".join(map(str, e.absolute_path)) for e in validator.iter_errors(manifest))
    assert paths == ["spec", "spec/backoffLimit"]


def test_combination_specific_fields():
    m = render(BASE + COMBOS["gpus-secrets-auth"][0])
    spec = m["spec"]
    assert m["metadata"] == {"name": "mal-intra", "namespace": "research",
                             "labels": {"app.kubernetes.io/name": "malora", "app.kubernetes.io/component": "search",
                                        "malora/space": "smoke"}}
    assert (spec["backoffLimit"], spec["ttlSecondsAfterFinished"], spec["activeDeadlineSeconds"]) == (5, 600, 86400)
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    argv = shlex.split(spec["entrypoint"])
    assert argv[argv.index("--experiment") + 1] == "intra" and argv[argv.index("--num-trials") + 1] == "64"
    env = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert refs == {"AWS_ACCESS_KEY_ID": {"name": "aws-creds", "key": "AWS_ACCESS_KEY_ID"},
                    "AWS_SECRET_ACCESS_KEY": {"name": "aws-creds", "key": "AWS_SECRET_ACCESS_KEY"},
                    "MLFLOW_TRACKING_TOKEN": {"name": "mlflow-auth", "key": "token"}}
    worker_pod = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker_pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in worker_pod["volumes"]

    pvc = render(BASE + COMBOS["cpu-pvc"][0])
    for group in (pvc["spec"]["rayClusterSpec"]["headGroupSpec"], pvc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]):
        pod = group["template"]["spec"]
        assert {"name": "pvc-0", "persistentVolumeClaim": {"claimName": "shared-rwx"}} in pod["volumes"]
        assert {"name": "pvc-0", "mountPath": "/mnt/shared"} in pod["containers"][0]["volumeMounts"]
        assert {"name": "MALORA_DATA_DIR", "value": "/mnt/shared/data"} in pod["containers"][0]["env"]
    assert pvc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"] == "cpu-workers"
    assert "--smoke-test" in shlex.split(pvc["spec"]["entrypoint"])


def test_no_secret_value_in_any_manifest(monkeypatch, capsys):
    for key, value in FAKE_SECRETS.items():
        monkeypatch.setenv(key, value)
    texts = []
    for extra, _, _ in COMBOS.values():
        assert k8s.main(["render", *BASE, *extra]) == 0
        texts.append(capsys.readouterr().out)
    assert all("kind: RayJob" in t for t in texts)
    blob = "\n".join(texts)
    leaked = [name for name, value in FAKE_SECRETS.items() if value in blob]
    assert leaked == []
    assert "&id" not in blob and "*id" not in blob  # plain YAML, no anchors


@pytest.mark.parametrize("extra, message", [
    (["--storage-path", "/data/runs"], "local path"),
    (["--storage-path", "file:///data/runs"], "local path"),
    (["--storage-path", "runs"], "relative"),
    (["--storage-path", "/mnt/other/runs", "--pvc", "rwx:/mnt/shared"], "local path"),
    (["--storage-path", "s3://AKIA:secret@bucket/x"], "credentials"),
    (["--storage-path", "ftp://host/x"], "unsupported scheme"),
    (["--mlflow-uri", "sqlite:///mlflow.db"], "relative"),
    (["--mlflow-uri", "https://user:pw@mlflow:5000"], "credentials"),
    (["--env", "AWS_SECRET_ACCESS_KEY=abc"], "--secret"),
    (["--env", "NOEQUALS"], "KEY=VALUE"),
    (["--secret", "Bad_Name:key"], "not a Secret name"),
    (["--secret", "aws:key.json"], "not an env var name"),
    (["--secret", "awsnokey"], "SECRET:KEY"),
    (["--secret", "a:X", "--secret", "b:X"], "set twice"),
    (["--name", "Malora_Run"], "DNS label"),
    (["--memory-per-worker", "32GB"], "quantity"),
    (["--workers", "0"], "at least 1"),
    (["--pvc", "claim-without-mount"], "CLAIM:/ABSOLUTE/MOUNT"),
    (["--namespace", "Research"], "namespace"),
    (["--space", "OUTSIDE"], "outside the project"),
    (["--space", "search_spaces/nope.yaml"], "no such file"),
])
def test_bad_input_one_line_exit_2(extra, message, capsys, tmp_path):
    outside = tmp_path / "space.yaml"  # a file outside the project
    outside.write_text("name: x\n")
    extra = [str(outside) if a == "OUTSIDE" else a for a in extra]
    assert k8s.main(["render", *BASE, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err


def test_default_name_is_stable_dns_label():
    a, b = render(BASE), render(BASE)
    name = a["metadata"]["name"]
    assert name == b["metadata"]["name"] and name.startswith("malora-smoke-") and len(name) <= kuberay.MAX_NAME
    assert kuberay.DNS_LABEL.match(name)
    assert render([*BASE, "--storage-path", "s3://bucket/other"])["metadata"]["name"] != name


# ------------------------------------------------------------------------------------- apply/status/delete
class FakeApi:
    def __init__(self, fail_status: int | None = None):
        self.calls: list[tuple] = []
        self.fail_status = fail_status

    def _maybe_fail(self):
        if self.fail_status:
            exc = Exception("api error")
            exc.status, exc.reason = self.fail_status, "Conflict" if self.fail_status == 409 else "Not Found"
            raise exc

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", group, version, namespace, plural, body["metadata"]["name"]))
        self._maybe_fail()
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", group, version, namespace, plural, name))
        self._maybe_fail()
        return {"status": {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running", "rayClusterName": f"{name}-x1",
                           "dashboardURL": f"{name}-head-svc.ns.svc:8265", "unrelated": 1}}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("delete", group, version, namespace, plural, name))
        self._maybe_fail()


def test_apply_status_delete_use_custom_objects_api(monkeypatch, tmp_path, capsys):
    api = FakeApi()
    monkeypatch.setattr(k8s, "custom_objects_api", lambda context=None: api)
    manifest_file = tmp_path / "job.yaml"
    assert k8s.main(["render", *BASE, "--name", "mal-a", "--namespace", "ns1", "-o", str(manifest_file)]) == 0
    assert k8s.main(["apply", "-f", str(manifest_file)]) == 0
    assert k8s.main(["apply", *BASE, "--name", "mal-b"]) == 0
    assert k8s.main(["status", "mal-a", "--namespace", "ns1"]) == 0
    assert k8s.main(["delete", "mal-a", "--namespace", "ns1"]) == 0
    assert api.calls == [("create", "ray.io", "v1", "ns1", "rayjobs", "mal-a"),
                         ("create", "ray.io", "v1", "default", "rayjobs", "mal-b"),
                         ("get", "ray.io", "v1", "ns1", "rayjobs", "mal-a"),
                         ("delete", "ray.io", "v1", "ns1", "rayjobs", "mal-a")]
    out = capsys.readouterr().out
    assert "jobStatus: RUNNING" in out and "rayClusterName: mal-a-x1" in out and "unrelated" not in out


def test_api_errors_are_one_line(monkeypatch, capsys):
    monkeypatch.setattr(k8s, "custom_objects_api", lambda context=None: FakeApi(fail_status=409))
    assert k8s.main(["apply", *BASE, "--name", "mal-a"]) == 2
    assert "already exists" in capsys.readouterr().err
    monkeypatch.setattr(k8s, "custom_objects_api", lambda context=None: FakeApi(fail_status=404))
    assert k8s.main(["status", "gone"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err


def test_apply_refuses_inline_secret_and_incomplete_options(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(k8s, "custom_objects_api", lambda context=None: FakeApi())
    manifest = render(BASE)
    manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "inline"})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert k8s.main(["apply", "-f", str(path)]) == 2
    assert "literal value" in capsys.readouterr().err
    assert k8s.main(["apply", "--space", SPACE]) == 2
    assert "--image" in capsys.readouterr().err


def test_missing_kubernetes_client_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # import kubernetes -> ImportError
    with pytest.raises(kuberay.ClusterError, match=r"pip install 'malora\[k8s\]'"):
        kuberay.custom_objects_api()


def test_shipped_example_matches_renderer(validator):
    example = REPO / "deploy" / "rayjob.example.yaml"
    header = [line for line in example.read_text().splitlines() if line.startswith("#   python -m orchestrator.k8s")]
    (command,) = header
    argv = shlex.split(command.removeprefix("#   python -m orchestrator.k8s"))
    body = yaml.safe_load(example.read_text())
    assert body == yaml.safe_load(kuberay.to_yaml(kuberay.render_rayjob(k8s.build_parser().parse_args(argv))))
    assert list(validator.iter_errors(body)) == []
