"""ASHA across --resume without a cluster: the rungs are rebuilt from the trials' reported history (Ray 2.60
restores none), and the time attribute is the evaluations done, so a restarted trial sits on its own rung."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from orchestrator.training.worker import evaluations_done
from orchestrator.tuning.asha import TIME_ATTR, ResumableASHA, reported_results

METRIC = "val/mean_acc"


def trial(tmp_path: Path, trial_id: str, history: list[tuple[int, float]] = (), method: str | None = None
          ) -> SimpleNamespace:
    """A stand-in for a restored Tune trial: its id, config and its storage folder holding ``result.json``."""
    folder = tmp_path / f"trial_{trial_id}"
    folder.mkdir()
    if history:
        lines = [json.dumps({TIME_ATTR: e, METRIC: v, "training_iteration": i + 1, "step": 2 * e})
                 for i, (e, v) in enumerate(history)]
        (folder / "result.json").write_text("\n".join(lines) + "\n{\"evaluations\": 3, \"val/me")  # cut by a kill
    return SimpleNamespace(trial_id=trial_id, path=str(folder), config={"method": method} if method else {},
                           storage=SimpleNamespace(
        storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_dir_name=folder.name))


def schedulers():
    kwargs = dict(time_attr=TIME_ATTR, metric=METRIC, mode="max", max_t=4, grace_period=1, reduction_factor=2)
    return ResumableASHA(**kwargs), AsyncHyperBandScheduler(**kwargs)


def test_reported_results_skip_a_line_cut_by_a_kill(tmp_path):
    t = trial(tmp_path, "a", [(1, 0.8), (2, 0.85)])
    assert [r[TIME_ATTR] for r in reported_results(t)] == [1, 2]
    assert list(reported_results(trial(tmp_path, "new"))) == []
    fresh = trial(tmp_path, "fresh")
    fresh.storage.trial_dir_name = None  # Tune has not named its folder yet (reading trial.path would raise)
    assert list(reported_results(fresh)) == []


def test_resumed_asha_stops_a_weak_new_trial_as_before_the_interruption(tmp_path):
    """Before the kill, trial a reached rung 1 at 0.8 and rung 2 at 0.85. After resume a new trial scoring 0.5 at
    its first evaluation is below the rung-1 cutoff: stopped by the rebuilt scheduler; a fresh ASHA (what
    Ray restores) has an empty rung and lets it run."""
    a = trial(tmp_path, "a", [(1, 0.8), (2, 0.85)])
    b = trial(tmp_path, "b")
    resumable, plain = schedulers()
    for s in (resumable, plain):
        s.on_trial_add(None, a)
        s.on_trial_add(None, b)
    assert resumable.rung_records() == {"": {4: {}, 2: {"a": 0.85}, 1: {"a": 0.8}}}  # no method: one group
    weak = {TIME_ATTR: 1, METRIC: 0.5}
    assert resumable.on_trial_result(None, b, dict(weak)) == TrialScheduler.STOP
    assert plain.on_trial_result(None, b, dict(weak)) == TrialScheduler.CONTINUE
    strong = trial(tmp_path, "c")
    resumable.on_trial_add(None, strong)
    assert resumable.on_trial_result(None, strong, {TIME_ATTR: 1, METRIC: 0.9}) == TrialScheduler.CONTINUE


def test_a_restarted_trial_is_judged_on_its_own_rung(tmp_path):
    """Trial c had done 1 evaluation (0.9) when the search was killed; restarted from its checkpoint it reports its
    2nd evaluation with Tune's training_iteration back at 1. On evaluations it meets rung 2 (a's 0.85) and
    stops at 0.2; on training_iteration it would be at rung 1 again, already recorded, and continue."""
    a = trial(tmp_path, "a", [(1, 0.8), (2, 0.85)])
    c = trial(tmp_path, "c", [(1, 0.9)])
    resumable, _ = schedulers()
    resumable.on_trial_add(None, a)
    resumable.on_trial_add(None, c)
    result = {TIME_ATTR: 2, "training_iteration": 1, METRIC: 0.2}
    assert resumable.on_trial_result(None, c, dict(result)) == TrialScheduler.STOP
    by_iteration = ResumableASHA(time_attr="training_iteration", metric=METRIC, mode="max", max_t=4,
                                 grace_period=1, reduction_factor=2)
    by_iteration.on_trial_add(None, a)
    by_iteration.on_trial_add(None, c)
    assert by_iteration.on_trial_result(None, c, dict(result)) == TrialScheduler.CONTINUE


def test_a_trial_restarted_twice_keeps_its_earlier_rungs_from_the_reported_history(tmp_path):
    """Tune rewrites a restarted trial's result.json: after its second restart trial d's file holds only its 3rd
    evaluation's line. That line's history list (val mean after evaluations 1, 2, 3) puts d back on rungs 1 and 2
    (0.7, 0.75), so a new trial at 0.6 is judged against a and d at rung 1, as before the restarts."""
    a = trial(tmp_path, "a", [(1, 0.8), (2, 0.85)])
    d = trial(tmp_path, "d")
    (Path(d.path) / "result.json").write_text(json.dumps({TIME_ATTR: 3, METRIC: 0.78, "training_iteration": 1,
                                                          "val/mean_acc_history": [0.7, 0.75, 0.78]}) + "\n")
    resumable, _ = schedulers()
    resumable.on_trial_add(None, a)
    resumable.on_trial_add(None, d)
    assert resumable.rung_records()[""] == {4: {}, 2: {"a": 0.85, "d": 0.75}, 1: {"a": 0.8, "d": 0.7}}
    # without the list only the 3rd evaluation is seen: Ray's bracket puts d on rung 2 at its later 0.78, and
    # rung 1 loses it
    (Path(d.path) / "result.json").write_text(json.dumps({TIME_ATTR: 3, METRIC: 0.78}) + "\n")
    plain_replay, _ = schedulers()
    plain_replay.on_trial_add(None, d)
    assert plain_replay.rung_records()[""] == {4: {}, 2: {"d": 0.78}, 1: {}}


def test_mean_acc_history_fills_what_a_restart_dropped():
    from orchestrator.evaluation.metrics import mean_acc_history

    lines = [{"evaluations": 3, "val/mean_acc": 0.6, "val/mean_acc_history": [0.4, 0.5, 0.6]},
             {"evaluations": 4, "val/mean_acc": 0.65}]
    assert mean_acc_history(lines) == {1: 0.4, 2: 0.5, 3: 0.6, 4: 0.65}
    # a later result wins; NaN values and rows without a number are skipped
    assert mean_acc_history([{"evaluations": 1, "val/mean_acc": 0.3}, {"val/mean_acc_history": [0.35]},
                             {"evaluations": float("nan"), "val/mean_acc": 0.9},
                             {"evaluations": 2, "val/mean_acc": float("nan")}]) == {1: 0.35}


def test_evaluations_come_from_the_step():
    assert [evaluations_done(s, 2) for s in (2, 4)] == [1, 2]
    assert [evaluations_done(s, 4) for s in (4, 8, 10)] == [1, 2, 3]  # a last partial window counts as one


def test_each_method_has_its_own_rungs(tmp_path):
    """LoRA's trial reached rung 1 at 0.8; MoLoRA's first trial arrives at 0.5: against LoRA's rung (one set of
    rungs, Ray's ASHA) it stops; on MoLoRA's own rungs it is the first and goes on. A second MoLoRA trial at 0.4
    is judged against the first (0.5) only: stopped. The scheduler pickles (Tune saves it with the Tuner)."""
    import pickle

    lora, molora = trial(tmp_path, "l", [(1, 0.8)], method="lora"), trial(tmp_path, "m", method="molora")
    resumable, plain = schedulers()
    for s in (resumable, plain):
        s.on_trial_add(None, lora)
        s.on_trial_add(None, molora)
    plain.on_trial_result(None, lora, {TIME_ATTR: 1, METRIC: 0.8})   # Ray's ASHA replays nothing: report it
    first = {TIME_ATTR: 1, METRIC: 0.5}
    assert plain.on_trial_result(None, molora, dict(first)) == TrialScheduler.STOP
    assert resumable.on_trial_result(None, molora, dict(first)) == TrialScheduler.CONTINUE
    second = trial(tmp_path, "m2", method="molora")
    resumable.on_trial_add(None, second)
    assert resumable.on_trial_result(None, second, {TIME_ATTR: 1, METRIC: 0.4}) == TrialScheduler.STOP
    records = resumable.rung_records()
    assert records["lora"][1] == {"l": 0.8} and records["molora"][1] == {"m": 0.5, "m2": 0.4}
    again = pickle.loads(pickle.dumps(resumable))
    assert again.rung_records() == records and "molora" in again.debug_string()
