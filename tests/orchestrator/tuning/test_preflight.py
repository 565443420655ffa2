"""Bad input that only shows when loading: a model or a data file that cannot be loaded stops the search in the
driver, before Ray starts, with one line and exit 2 (no Ray needed: starting Ray here fails the test)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from orchestrator import search
from orchestrator.cluster import runtime
from orchestrator.spec.space import load_space
from orchestrator.tuning.run import preflight

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"


@pytest.fixture()
def space(tmp_path, shared_data_dir, monkeypatch):
    """smoke.yaml over a private copy of its two tasks' files; Ray must not start."""
    for key in runtime.TRAIN_ENV_DEFAULTS:  # prepare_env sets them: restored after the test
        monkeypatch.setenv(key, runtime.TRAIN_ENV_DEFAULTS[key])
    monkeypatch.setattr("orchestrator.tuning.run.init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data" / "commonsense"
    for folder in ("boolq", "ARC-Easy"):
        shutil.copytree(shared_data_dir / "commonsense" / folder, data / folder)
    raw = yaml.safe_load((SPACES / "smoke.yaml").read_text())
    raw["data"]["data_dir"] = str(tmp_path / "data")
    raw["storage_path"] = str(tmp_path / "ray_results")
    path = tmp_path / "space.yaml"

    def write(**model) -> Path:
        raw["model"].update(model)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path
    return write, data


def test_a_loadable_search_passes(space):
    write, _ = space
    assert preflight(load_space(write())) is None


def test_a_corrupt_data_file_is_one_line_and_exit_2(space, capsys):
    write, data = space
    (data / "boolq" / "test.json").write_text('[{"instruction": "cut off')
    assert search.main(["--space", str(write())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data: ") and "boolq/test.json" in err[0], err


def test_a_missing_data_file_is_one_line_and_exit_2(space, capsys):
    write, data = space
    (data / "ARC-Easy" / "test.json").unlink()
    assert search.main(["--space", str(write())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ARC-Easy/test.json" in err[0] and err[0].startswith("error: data: "), err


def test_a_model_that_cannot_be_loaded_is_one_line_and_exit_2(space, tmp_path, capsys):
    write, _ = space
    (tmp_path / "not-a-model").mkdir()
    assert search.main(["--space", str(write(name=str(tmp_path / "not-a-model")))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.name: cannot load model"), err
    assert search.main(["--space", str(write(name="no-such-org/no-such-model"))]) == 2
    assert "HF_HUB_OFFLINE=1" in capsys.readouterr().err


def test_unequal_budgets_are_refused_naming_methods_counts_and_the_key(space, capsys):
    """Hand counts (METHODS.md §1.5) on tiny-llama's q_proj (64 -> 64) and v_proj (64 -> 32), 2 layers:
    LoRA r4 = 2 * 4 * (128 + 96) = 1,792 (the budget: no molora, first method); MALoRA r4, N4 at d = 8 (r_bar 6)
    = 2 * (2 * (8 * 64 + 4 * 6 * 8 + 4 * 64) + 4 * 6 * (64 + 32)) = 8,448 and at d = 16 (r_bar 4) 9,216."""
    write, _ = space
    path = write()
    raw = yaml.safe_load(path.read_text())
    raw["search"]["match_budget"] = True
    raw["methods"]["lora"]["r"] = 4
    raw["search"]["points_to_evaluate"] = [{"method": "malora", "d": 16, "beta": 1.25}]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert search.main(["--space", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: search.match_budget: "), err
    assert "(lora: 1,792 on tiny-llama)" in err[0] and "malora 8,448-9,216 (+371% to +414%)" in err[0], err
    assert "lora 1,792" not in err[0]  # the budget method itself is within it
    raw["methods"]["lora"]["r"] = 20  # 2 * 20 * 224 = 8,960: MALoRA is within -5.7 % .. +2.9 % of it
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert preflight(load_space(path)) is None
