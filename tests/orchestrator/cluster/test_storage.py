"""Files on the storage: a local folder (pathlib, as before) and an S3 URI (pyarrow.fs against a real S3 server)."""

from __future__ import annotations

import pytest

from orchestrator.cluster import storage
from tests.orchestrator.s3 import s3_keys, s3_server


@pytest.fixture()
def s3(tmp_path, monkeypatch):
    with s3_server("bucket", tmp_path) as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield env


def test_join_keeps_the_scheme_and_local_paths_stay_paths(tmp_path):
    assert storage.join("s3://bucket/prefix/", "smoke", "reference.json") == "s3://bucket/prefix/smoke/reference.json"
    assert storage.join(str(tmp_path), "smoke") == str(tmp_path / "smoke")
    assert storage.is_uri("gs://b") and not storage.is_uri(str(tmp_path))


def test_local_text_round_trip_and_missing_file(tmp_path):
    path = storage.join(str(tmp_path), "a", "b.json")
    assert storage.read_text(path) is None
    storage.write_text(path, '{"x": 1}')
    assert (tmp_path / "a" / "b.json").read_text() == '{"x": 1}' and storage.read_text(path) == '{"x": 1}'
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.json"]  # no temporary file left behind


def test_local_dir_and_local_copy_of_a_local_folder_are_the_folder(tmp_path):
    with storage.local_dir(tmp_path / "out") as local:
        assert local == tmp_path / "out" and local.is_dir()
    with storage.local_copy(tmp_path / "out") as found:
        assert found == tmp_path / "out"
    with storage.local_copy(tmp_path / "missing") as found:
        assert found is None


def test_s3_text_round_trip_and_missing_file(s3):
    path = "s3://bucket/prefix/smoke/reference.json"
    assert storage.read_text(path) is None
    storage.write_text(path, "hello")
    assert storage.read_text(path) == "hello"
    assert s3_keys(s3, "bucket") == {"prefix/smoke/reference.json"}


def test_s3_local_dir_uploads_on_success_only(s3):
    with storage.local_dir("s3://bucket/out") as local:
        (local / "summary.csv").write_text("a,b\n")
        (local / "sub").mkdir()
        (local / "sub" / "x.txt").write_text("x")
    assert s3_keys(s3, "bucket", "out/") == {"out/summary.csv", "out/sub/x.txt"}
    assert not local.exists()
    with pytest.raises(RuntimeError, match="boom"):
        with storage.local_dir("s3://bucket/failed") as local:
            (local / "partial.csv").write_text("a\n")
            raise RuntimeError("boom")
    assert s3_keys(s3, "bucket", "failed/") == set()


def test_s3_local_copy_downloads_a_prefix_stripped_path_on_the_roots_file_system(s3):
    storage.write_text("s3://bucket/p/train/ckpt/adapter/adapter_config.json", "{}")
    storage.write_text("s3://bucket/p/train/ckpt/adapter/adapter_model.safetensors", "weights")
    # Ray reports checkpoint paths without the scheme: bucket/p/...
    with storage.local_copy("bucket/p/train/ckpt/adapter", root="s3://bucket/p") as local:
        assert sorted(f.name for f in local.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        assert (local / "adapter_model.safetensors").read_text() == "weights"
    assert not local.exists()
    with storage.local_copy("s3://bucket/p/train/none/adapter") as missing:
        assert missing is None
