"""The smoke search on remote storage: ``--storage-path s3://...`` against a real S3 API server on 127.0.0.1.

moto in server mode serves S3; the search subprocess (and its Ray workers) reach it the way they would reach AWS,
through ``AWS_ENDPOINT_URL`` and the usual credential variables. The MLflow store is local SQLite. Checked: the
summaries and the reference cache are objects in the bucket (nothing lands in a local folder named ``s3:``), the
trials' adapters reach MLflow from their remote checkpoints, and ``--resume`` continues from the bucket without
recomputing the base-model reference; a study (fixed configurations, one seed) writes its results to the
bucket by default.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.orchestrator.e2e import mlflow_client, subprocess_env
from tests.orchestrator.s3 import s3_client, s3_keys, s3_server

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "smoke.yaml"
BUCKET, PREFIX = "malora-e2e", "runs"
STORAGE = f"s3://{BUCKET}/{PREFIX}"


def _search(tmp_path: Path, env: dict, *extra: str, log: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "orchestrator.search", "--space", str(SPACE), "--storage-path", STORAGE, *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    (tmp_path / log).write_text(proc.stdout + proc.stderr)
    return proc


def _read(path: str) -> str:
    """An object of the bucket, read back through pyarrow (the file system Ray writes with)."""
    import pyarrow.fs

    fs, p = pyarrow.fs.FileSystem.from_uri(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def _etag(env: dict, key: str) -> str:
    """The object's content hash, from the server."""
    return s3_client(env).head_object(Bucket=BUCKET, Key=key)["ETag"]


@pytest.fixture()
def s3(tmp_path, monkeypatch):
    with s3_server(BUCKET, tmp_path) as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)  # for the reads in the tests, through pyarrow
        yield env


def test_smoke_search_on_s3_logs_adapters_writes_summaries_and_resumes(tmp_path, shared_data_dir, s3):
    env = {**subprocess_env(shared_data_dir), **s3}

    proc = _search(tmp_path, env, log="first.log")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "base zero-shot accuracy {" in out  # computed once, on the first run

    keys = s3_keys(s3, BUCKET, f"{PREFIX}/smoke/")
    assert {f"{PREFIX}/smoke/{f}" for f in ("summary.csv", "summary.md", "pareto.json", "pareto.png",
                                            "reference.json")} <= keys
    assert any(k.endswith("/adapter/adapter_model.safetensors") for k in keys)  # Train's checkpoints
    rows = list(csv.DictReader(io.StringIO(_read(f"{STORAGE}/smoke/summary.csv"))))
    assert sorted(r["method"] for r in rows) == ["lora", "malora"]
    assert _read(f"{STORAGE}/smoke/pareto.json").lstrip().startswith("[")
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "ray_results").exists()

    c = mlflow_client(tmp_path)
    exp = c.get_experiment_by_name("malora-smoke")
    runs = c.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].data.params["storage"] == f"{STORAGE}/smoke"
    assert len(children) == 2
    for run in children:
        assert run.info.status == "FINISHED"
        adapter = {a.path for a in c.list_artifacts(run.info.run_id, "adapter")}
        assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= adapter, adapter
        local = Path(c.download_artifacts(run.info.run_id, "adapter/adapter_model.safetensors",
                                          str(tmp_path / run.info.run_id)))
        assert local.stat().st_size > 0
    summary_arts = {a.path for a in c.list_artifacts(parents[0].info.run_id, "summary")}
    assert {"summary/summary.csv", "summary/pareto.json"} <= summary_arts

    reference_key = f"{PREFIX}/smoke/reference.json"
    before = _etag(s3, reference_key), _read(f"{STORAGE}/smoke/reference.json")
    proc = _search(tmp_path, env, "--resume", log="resume.log")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"base zero-shot accuracy from {STORAGE}/smoke/reference.json" in out
    assert "base zero-shot accuracy {" not in out  # not recomputed
    # the same object (Tune re-uploads its restored experiment folder, so the modification time may change)
    assert (_etag(s3, reference_key), _read(f"{STORAGE}/smoke/reference.json")) == before
    runs = c.search_runs([exp.experiment_id], max_results=100)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)  # no duplicate, all closed


def test_study_on_s3_writes_its_results_to_the_bucket(tmp_path, shared_data_dir, s3):
    raw = yaml.safe_load(SPACE.read_text())
    raw["search"]["asha"] = {"enabled": False}
    raw["tracking"]["experiment"] = "e2e-study-s3"
    raw["study"] = {"seeds": 1, "search": False, "single_task": False, "zero_shot": True, "n_boot": 200,
                    "configs": {"lora": {"r": 4, "lr": 3.0e-3}, "malora": {"d": 16, "beta": 1.25, "lr": 3.0e-3}}}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    cmd = [sys.executable, "-m", "orchestrator.study", "--space", str(space), "--storage-path", STORAGE]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**subprocess_env(shared_data_dir), **s3}, capture_output=True,
                          text=True, timeout=900)
    (tmp_path / "study.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = f"{STORAGE}/smoke-study/results"
    assert f"results: {results}/results.md" in proc.stdout
    keys = s3_keys(s3, BUCKET, f"{PREFIX}/")
    assert {f"{PREFIX}/smoke-study/results/{f}" for f in ("results.json", "results.md", "results.csv")} <= keys
    assert f"{PREFIX}/smoke/reference.json" in keys
    res = json.loads(_read(f"{results}/results.json"))
    assert set(res["methods"]) == {"lora", "malora"} and set(res["zero_shot"]) == {"boolq", "arc_e"}
    assert not (tmp_path / "s3:").exists()
    c = mlflow_client(tmp_path)
    exp = c.get_experiment_by_name("e2e-study-s3")
    study = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("malora.role") == "study"]
    assert len(study) == 1 and study[0].info.status == "FINISHED"
    assert "results/results.json" in {a.path for a in c.list_artifacts(study[0].info.run_id, "results")}
    for run in (r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("malora.role") == "replicate"):
        assert "adapter/adapter_model.safetensors" in {a.path for a in c.list_artifacts(run.info.run_id, "adapter")}
