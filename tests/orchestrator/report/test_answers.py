"""Every answer kept: a study report written to a folder is written again from its answers file alone (no
training), with the same statistics; an altered or missing answers file is refused, and the CLI says so (exit 2).
Also the study clock: running time summed over launches, a killed launch included."""

from __future__ import annotations

import dataclasses
import gzip
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from orchestrator.report import study_report
from orchestrator.report.answers import FILE, AnswersError, read_answers
from orchestrator.tuning.clock import RunClock
from tests.orchestrator.report.test_study_report import TASKS, _runs, _spec, _split


def _study(tmp_path):
    rng = np.random.default_rng(3)
    n = 60
    zero = {t: (rng.random(n) < 0.4).astype(int) for t in TASKS}
    lora = {t: (rng.random((3, n)) < 0.55).astype(int) for t in TASKS}
    molora = {t: (rng.random((3, n)) < 0.5).astype(int) for t in TASKS}
    spec = _spec(tmp_path)
    done = _runs("lora", lora) + _runs("molora", molora)
    for r in done:   # the chosen option and gold per item, as the trials record them
        for t in TASKS:
            r["metrics"][f"test_chosen/{t}"] = [int(c) for c in rng.integers(0, 4, n)]
    reference = {"test_correct": {t: zero[t].tolist() for t in TASKS},
                 "test_chosen": {t: [0] * n for t in TASKS}}
    configs = {"lora": {"method": "lora"}, "molora": {"method": "molora"}}
    clock = {"running_s": 120.0, "elapsed_s": 300.0, "launches": [{"start": 0.0, "running_s": 120.0, "command": "cmd"}]}
    results = study_report.build_results(spec, configs, done, reference, _split(n), wall_s=3.0, command="cmd",
                                         clock=clock)
    folder = tmp_path / "report"
    folder.mkdir()
    record = study_report.answers_record(configs, _split(n), done, reference)
    study_report._write_files(results, record, folder)
    return spec, results, folder


def test_the_report_is_written_again_from_its_answers_with_the_same_numbers(tmp_path):
    spec, first, folder = _study(tmp_path)
    assert first["answers"]["file"] == FILE and (folder / FILE).is_file()
    kept = json.loads(gzip.decompress((folder / FILE).read_bytes()))
    lora_seed1 = next(r for r in kept["runs"] if r["run"]["method"] == "lora" and r["run"]["seed"] == 1)
    assert len(lora_seed1["metrics"]["test_correct/piqa"]) == 60 and len(lora_seed1["metrics"]["test_chosen/piqa"]) == 60
    again = study_report.rewrite_report(spec, folder / "results.json", tmp_path / "again", command="report-only")
    r = again["results"]
    for key in ("diff", "ci95", "p", "p_holm", "mdd80", "se", "df"):
        assert r["comparisons"][0][key] == pytest.approx(first["comparisons"][0][key])
    for m in ("lora", "molora"):
        assert r["methods"][m]["mean"] == first["methods"][m]["mean"]
        assert r["methods"][m]["delta_vs_zero_shot"]["p"] == pytest.approx(first["methods"][m]["delta_vs_zero_shot"]["p"])
    assert r["meta"]["report_command"] == "report-only" and r["meta"]["command"] == first["meta"]["command"]
    # the recorded running time stays the study's, not the last launch's
    assert r["provenance"]["wall_s"] == first["provenance"]["wall_s"] == 120.0
    assert (r["meta"]["running_s"], r["meta"]["elapsed_s"]) == (120.0, 300.0)
    # the same answers give the same bytes and hash
    assert json.loads((tmp_path / "again" / "results.json").read_text())["answers"]["sha256"] == first["answers"]["sha256"]


def test_altered_or_missing_answers_are_refused(tmp_path):
    spec, _, folder = _study(tmp_path)
    data = json.loads(gzip.decompress((folder / FILE).read_bytes()))
    data["runs"][0]["metrics"]["test_correct/piqa"][0] ^= 1
    (folder / FILE).write_bytes(gzip.compress(json.dumps(data).encode()))
    with pytest.raises(AnswersError, match="sha256 differs"):
        read_answers(folder / "results.json")
    (folder / FILE).unlink()
    with pytest.raises(AnswersError, match="missing"):
        read_answers(folder / "results.json")
    out = subprocess.run([sys.executable, "-m", "orchestrator.study", "--space", "search_spaces/intra_domain_cpu.yaml",
                          "--report-only", "--results", str(folder / "results.json")], capture_output=True, text=True)
    assert out.returncode == 2 and "answers.json.gz: missing" in out.stderr


def test_the_clock_sums_every_launch_a_killed_one_included(tmp_path):
    first = RunClock(str(tmp_path), "s", interval_s=0.05).start("launch 1", resume=False)
    time.sleep(0.4)
    first._stop.set()                                    # killed: no final write, only its last heartbeat
    time.sleep(0.3)                                      # the study lies stopped
    second = RunClock(str(tmp_path), "s", interval_s=0.05).start("launch 2 --resume", resume=True,
                                                                  code={"commit": "abc", "dirty": True})
    time.sleep(0.3)
    summary = second.summary()
    assert [x["command"] for x in summary["launches"]] == ["launch 1", "launch 2 --resume"]
    assert [x.get("commit") for x in summary["launches"]] == [None, "abc"] and summary["launches"][1]["dirty"]
    assert summary["launches"][0]["running_s"] == pytest.approx(0.4, abs=0.12)
    assert summary["running_s"] == pytest.approx(0.7, abs=0.2)
    assert summary["elapsed_s"] >= summary["running_s"] + 0.2   # the stopped time shows as the difference
    # read after the run (a rebuilt report): the span ends at the last launch's last sign of life, not now
    second._stop.set()
    time.sleep(0.3)
    later = RunClock(str(tmp_path), "s", filename="study_clock.json").summary()
    assert later["elapsed_s"] == pytest.approx(summary["elapsed_s"], abs=0.12)
    assert later["running_s"] == pytest.approx(summary["running_s"], abs=0.12)


def test_rerun_reads_a_cells_items_from_the_kept_answers(tmp_path):
    from orchestrator.rerun import kept_items

    _, results, folder = _study(tmp_path)
    items = kept_items(folder / "results.json", "molora", 2)
    # the per-item answers behind the recorded per-seed accuracy of that cell
    for t in TASKS:
        assert sum(items[t]) / len(items[t]) == pytest.approx(results["methods"]["molora"]["per_task"][t]["per_seed"]["2"])
    assert kept_items(folder / "results.json", "molora", 9) is None


def test_the_report_draws_the_seesaw_from_the_runs_diagnostics_and_histories(tmp_path):
    from orchestrator.evaluation.diagnostics_record import diagnostics_record
    from tests.orchestrator.report.test_study_report import LORA, MOLORA, SINGLE

    spec = _spec(tmp_path)
    spec = dataclasses.replace(spec, study=dataclasses.replace(spec.study, single_task=True, n_boot=200))
    done = _runs("lora", LORA) + _runs("molora", MOLORA) + [
        r for t in TASKS for r in _runs("lora", {t: SINGLE[t]}, role="single_task")]
    cos = [[1.0, -0.5], [-0.5, 1.0]]
    routing = {"mi": 0.2, "mi_norm": 0.2, "max_share": 0.6, "mi_by_layer": {"l0": 0.2}, "mi_by_group": {"mlp_late": 0.2},
               "mi_norm_by_group": {"mlp_late": 0.2}, "most": {"layer": "l0", "mi": 0.2, "share": [[1, 0], [0, 1]]},
               "least": {"layer": "l0", "mi": 0.2, "share": [[1, 0], [0, 1]]}}
    conflict = {"tasks": list(TASKS), "cos": {"all": cos}, "most_negative": {"all": {"pair": list(TASKS), "value": -0.5}},
                "mean": {"all": -0.5}, "probe": {"seed": 0, "keys": {t: [t] for t in TASKS}}}
    for r in done:
        run = r["run"]
        tasks = [run["task"]] if run["role"] == "single_task" else list(TASKS)
        r["history"] = {t: [[2, 0.4], [4, 0.5 + 0.01 * run["seed"]]] for t in tasks}
        if run["role"] == "replicate":
            r["metrics"]["diagnostics"] = diagnostics_record(list(TASKS), routing, conflict)
    configs = {"lora": {"method": "lora"}, "molora": {"method": "molora"}}
    results = study_report.build_results(spec, configs, done, None, _split(4), wall_s=1.0, command="cmd")
    folder = tmp_path / "out"
    folder.mkdir()
    study_report._write_files(results, study_report.answers_record(configs, _split(4), done, None), folder)
    text = (folder / "results.md").read_text()
    assert "seesaw_over_training.png" in text and (folder / "seesaw_over_training.png").stat().st_size > 0
    section = json.loads((folder / "results.json").read_text())["seesaw_diagnostics"]
    # piqa's most conflicting partner is boolq (cosine -0.5), beside piqa's Δ vs single-task
    row = next(r for r in section["methods"]["lora"]["conflict_table"] if r["task"] == "piqa")
    assert row["partner"] == "boolq" and row["cos"] == pytest.approx(-0.5)
    assert row["delta"] == pytest.approx(results["methods"]["lora"]["per_task"]["piqa"]["delta_vs_single_task"]["diff"])
    again = study_report.rewrite_report(spec, folder / "results.json", tmp_path / "again", command="again")
    assert again["results"]["seesaw_diagnostics"]["methods"]["lora"]["conflict_table"] == section["methods"]["lora"]["conflict_table"]
