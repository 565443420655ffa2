"""The study's recorded provenance: file hashes against hashlib over the whole file, the files the suite reads
listed by hand, package versions against the packages' own ``__version__``."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from pathlib import Path

import numpy
import pytest
import scipy

from orchestrator.models.hardware import machine_info
from orchestrator.spec.space import load_space
from orchestrator.tuning import provenance

ROOT = Path(__file__).resolve().parents[3]


def _spec(tasks: tuple[str, ...], data_dir: Path | None, model: str = "tiny-llama"):
    spec = load_space(ROOT / "search_spaces/smoke.yaml")
    return dataclasses.replace(spec, data=dataclasses.replace(spec.data, suite=None, tasks=tasks,
                                                              data_dir=None if data_dir is None else str(data_dir)),
                               model=dataclasses.replace(spec.model, name=model))


def test_data_files_are_the_ones_the_suite_reads(shared_data_dir):
    spec = _spec(("boolq", "piqa", "gsm8k", "pubmedqa", "aqua"), shared_data_dir)
    expected = ["commonsense/boolq/train.json", "commonsense/boolq/test.json",
                "commonsense/piqa/test.json",                                   # piqa has no train.json: carved
                "math/gsm8k/train.jsonl", "math/gsm8k/test.jsonl",
                "medical/pubmedqa/ori_pqal.json", "medical/pubmedqa/test_ground_truth.json", "math/AQuA/test.json"]
    assert [str(p.relative_to(shared_data_dir)) for p in provenance.data_files(spec)] == expected
    hashes = provenance.data_sha256(spec)
    assert list(hashes) == expected
    for rel in ("commonsense/piqa/test.json", "medical/pubmedqa/test_ground_truth.json"):
        assert hashes[rel] == hashlib.sha256((shared_data_dir / rel).read_bytes()).hexdigest()
    assert provenance.data_sha256(_spec(("boolq",), None)) == {}                 # the Hub: nothing to hash


def test_a_local_model_folder_is_hashed_by_its_weight_files(tmp_path):
    (tmp_path / "model-00001.safetensors").write_bytes(b"first shard")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model-00002.safetensors").write_bytes(b"second shard" * 100_000)
    (tmp_path / "config.json").write_text("{}")                                 # not a weight file
    rec = provenance.model_record(_spec(("boolq",), None, model=str(tmp_path)))
    one, two = (hashlib.sha256(b"first shard").hexdigest(), hashlib.sha256(b"second shard" * 100_000).hexdigest())
    assert rec["model_files"] == {"model-00001.safetensors": one, "sub/model-00002.safetensors": two}
    lines = f"model-00001.safetensors {one}\nsub/model-00002.safetensors {two}"
    assert rec["model_sha256"] == hashlib.sha256(lines.encode()).hexdigest()


def test_smollm2_is_hashed_by_its_gguf_file():
    from orchestrator.models.loading import ModelError, smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except ModelError as exc:
        pytest.skip(str(exc))
    rec = provenance.model_record(_spec(("boolq",), None, model="smollm2-135m-instruct"))
    assert rec["model_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert list(rec["model_files"]) == [gguf.name]


def test_tiny_llama_records_its_config():
    rec = provenance.model_record(_spec(("boolq",), None))
    assert rec["model_sha256"] is None
    assert (rec["model_config"]["hidden_size"], rec["model_config"]["num_hidden_layers"]) == (64, 2)


def test_packages_machine_and_throughput():
    versions = provenance.package_versions(("numpy", "scipy", "no-such-package-here", "malora"))
    assert versions["numpy"] == numpy.__version__ and versions["scipy"] == scipy.__version__
    assert versions["no-such-package-here"] is None
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert versions["malora"] == re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    done = [{"metrics": {"tokens_per_s": 100.0}}, {"metrics": {"tokens_per_s": 300.0}},
            {"metrics": {"tokens_per_s": math.nan}}, {"metrics": {}}]
    rec = provenance.study_provenance(_spec(("boolq",), None), done, wall_s=12.34)
    assert rec["tokens_per_s"] == 200.0 and rec["wall_s"] == 12.3 and rec["machine"] == machine_info()
    assert rec["data_source"] == "Hugging Face Hub" and rec["data_sha256"] == {}
