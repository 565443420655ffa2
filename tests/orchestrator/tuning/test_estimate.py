"""The study's wall-time arithmetic (``orchestrator.tuning.estimate``) against hand-computed numbers.

The rates are given here (the calibration measures them on the machine; it is not run in a unit test)."""

import pytest

from orchestrator.spec.space import load_space
from orchestrator.tuning.calibrate import study_shapes
from orchestrator.tuning.estimate import Rates, RunShape, describe_estimate, estimate, makespan, run_parts

RATES = Rates(train_tokens_per_s={"lora": 400.0, "molora": 200.0},
              score_s_per_item={"lora": {"a": 0.1, "b": 0.2}, "molora": {"a": 0.2, "b": 0.4},
                                "zero_shot": {"a": 0.05, "b": 0.1}},
              setup_s={"lora": 10.0, "molora": 20.0}, tokens_per_example={"a": 40.0, "b": 100.0})
VAL, TEST = {"a": 50, "b": 50}, {"a": 200, "b": 100}
SHAPES = [
    RunShape("lora", "lora", 100, 32, {"a": 300, "b": 100}, VAL, TEST, 2),
    RunShape("molora", "molora", 100, 32, {"a": 300, "b": 100}, VAL, TEST, 2),
    RunShape("st b", "lora", 25, 32, {"b": 100}, {"b": 50}, {"b": 100}, 1),
    RunShape("st a", "lora", 75, 32, {"a": 300}, {"a": 50}, {"a": 200}, 2),
]


def test_run_parts_by_hand():
    # tau = (300*40 + 100*100) / 400 = 55 tokens; train = 100 * 32 * 55 / 400 = 440 s;
    # scoring = (2*50 + 200) * 0.1 + (2*50 + 100) * 0.2 = 30 + 40 = 70 s
    assert run_parts(SHAPES[0], RATES) == pytest.approx((10.0, 440.0, 70.0))
    assert run_parts(SHAPES[1], RATES) == pytest.approx((20.0, 880.0, 140.0))   # half the tokens/s, double s/item
    assert run_parts(SHAPES[2], RATES) == pytest.approx((10.0, 200.0, 30.0))    # 25*32*100/400; (50+100)*0.2
    assert run_parts(SHAPES[3], RATES) == pytest.approx((10.0, 240.0, 30.0))    # 75*32*40/400; (100+200)*0.1
    # the gradient-conflict probe: 2 evaluations x 16 examples at the training rate, 2*16*55/400 = 4.4 s more
    probed = RunShape("lora", "lora", 100, 32, {"a": 300, "b": 100}, VAL, TEST, 2, probe_examples=16)
    assert run_parts(probed, RATES) == pytest.approx((10.0, 444.4, 70.0))


def test_probe_examples_per_evaluation():
    from types import SimpleNamespace

    from orchestrator.tuning.estimate import probe_examples

    on = SimpleNamespace(eval=SimpleNamespace(grad_conflict=True, probe_items=8))
    off = SimpleNamespace(eval=SimpleNamespace(grad_conflict=False, probe_items=8))
    assert (probe_examples(on, 5), probe_examples(on, 1), probe_examples(off, 5)) == (40, 0, 0)


def test_estimate_schedules_runs_on_slots():
    zero = {"a": 250, "b": 150}  # 250*0.05 + 150*0.1 = 27.5 s
    # runs 520, 1040, 240, 280 s on 2 slots: A 520 -> 760 -> 1040, B 1040: makespan 1040
    est = estimate(SHAPES, RATES, slots=2, zero_shot_items=zero)
    assert est.zero_shot_s == pytest.approx(27.5)
    assert [d for _, d in est.run_s] == pytest.approx([520.0, 1040.0, 240.0, 280.0])
    assert est.wall_s == pytest.approx(1067.5)
    assert (est.train_s, est.score_s) == pytest.approx((1760.0, 270.0))
    assert estimate(SHAPES, RATES, slots=1, zero_shot_items=zero).wall_s == pytest.approx(2107.5)
    assert est.exceeds(1000.0) and not est.exceeds(1100.0)
    assert "EXCEEDED by 1.1 min" in describe_estimate(est, bound_s=1000.0)
    assert "within it" in describe_estimate(est, bound_s=1100.0)


def test_the_measured_slowdown_of_trials_at_once_scales_every_run_but_not_the_zero_shot():
    import dataclasses

    from orchestrator.tuning.estimate import slowdown_text

    zero = {"a": 250, "b": 150}
    slowed = dataclasses.replace(RATES, slowdown=1.5, slowdown_slots=2)
    est = estimate(SHAPES, slowed, slots=2, zero_shot_items=zero)
    # runs 1.5 x (520, 1040, 240, 280): A 780 -> 1140 -> 1560, B 1560: makespan 1560, plus the 27.5 s zero-shot
    assert [d for _, d in est.run_s] == pytest.approx([780.0, 1560.0, 360.0, 420.0])
    assert est.wall_s == pytest.approx(27.5 + 1560.0) and est.train_s == pytest.approx(1.5 * 1760.0)
    # one slot: nothing shares the machine, the slowdown does not apply
    assert estimate(SHAPES, slowed, slots=1, zero_shot_items=zero).wall_s == pytest.approx(2107.5)
    assert "2 trials at once each run 1.50x slower" in slowdown_text(slowed, 2)
    assert "not measured" in slowdown_text(RATES, 2) and slowdown_text(RATES, 1) == ""


def test_rays_own_cores_lengthen_every_run_by_the_trials_share_of_what_is_left():
    import dataclasses

    from orchestrator.tuning.estimate import slowdown_text
    from orchestrator.tuning.ray_overhead import ray_factor

    # f = c n / (C - o): two one-CPU trials on 2 cores beside 0.3 cores of Ray get 1.7 cores, 2 / 1.7 = 1.1765
    assert ray_factor(0.3, 2, 1, 2.0) == pytest.approx(2 / 1.7)
    assert ray_factor(0.3, 2, 2, 4.0) == pytest.approx(4 / 3.7)
    assert ray_factor(0.3, 2, 1, 16.0) == 1.0            # cores to spare: no slowdown
    assert ray_factor(5.0, 2, 1, 2.0) == pytest.approx(20.0)   # Ray takes it all: each trial keeps 5 %
    zero = {"a": 250, "b": 150}
    both = dataclasses.replace(RATES, slowdown=1.5, slowdown_slots=2, ray_cores=0.3, ray_slowdown=2 / 1.7)
    est = estimate(SHAPES, both, slots=2, zero_shot_items=zero)
    # runs 1.5 x 1.1765 x (520, 1040, 240, 280) = 1.7647 x: the makespan 1040 x 1.7647 = 1835.3, zero-shot alone
    assert [d for _, d in est.run_s] == pytest.approx([917.65, 1835.29, 423.53, 494.12], rel=1e-4)
    assert est.wall_s == pytest.approx(27.5 + 1040 * 1.5 * 2 / 1.7)
    # measured at 2 slots: a plan for another number of slots gets neither factor
    assert estimate(SHAPES, both, slots=1, zero_shot_items=zero).wall_s == pytest.approx(2107.5)
    assert "Ray's own processes take 0.30 cores: each run 1.18x longer" in slowdown_text(both, 2)
    assert "Ray" not in slowdown_text(dataclasses.replace(RATES, slowdown=1.5, slowdown_slots=2), 2)


def test_slowdown_is_the_alone_rate_over_the_mean_rate_together():
    from orchestrator.tuning.contention import measure_slowdown, slowdown

    assert slowdown(120.0, [70.0, 80.0]) == pytest.approx(120.0 / 75.0)
    assert slowdown(100.0, [101.0, 103.0]) == 1.0   # faster together: noise, never below 1
    spec = load_space("search_spaces/intra_domain_cpu.yaml")
    # one slot: nothing to measure (no process is started, so no model is needed)
    assert measure_slowdown(spec, {}, steps=3, slots=1) == {"slots": 1, "slowdown": 1.0, "alone": None,
                                                            "together": None}


def test_makespan_fills_the_slot_free_first():
    assert makespan([5.0, 1.0, 1.0, 1.0], 2) == pytest.approx(5.0)   # B takes 1, 1, 1 while A runs 5
    assert makespan([1.0, 1.0, 5.0], 2) == pytest.approx(6.0)        # the 5 starts at 1
    assert makespan([], 3) == 0.0


def test_study_shapes_from_the_shipped_space():
    spec = load_space("search_spaces/intra_domain_cpu.yaml")  # max_steps 150, batch 32, eval every 150 steps
    runs = [{"role": "replicate", "method": "malora", "seed": 1, "task": None, "config": {}},
            {"role": "single_task", "method": "lora", "seed": 0, "task": "boolq", "config": {},
             "num_train_examples": 100, "max_steps": 50}]
    splits = {"boolq": {"val": 50, "test": 300}, "piqa": {"val": 40, "test": 200}}
    rep, single = study_shapes(spec, runs, splits, {"boolq": 100, "piqa": 200})
    assert (rep.method, rep.steps, rep.examples_per_step, rep.evaluations) == ("malora", 150, 32, 1)
    assert rep.tasks == {"boolq": 100, "piqa": 200} and rep.test_items == {"boolq": 300, "piqa": 200}
    assert (single.steps, single.tasks, single.val_items, single.test_items) == (50, {"boolq": 100}, {"boolq": 50},
                                                                                 {"boolq": 300})


def test_calibration_cache_key_names_the_machine_and_the_setting():
    from orchestrator.models.hardware import cpu_info
    from orchestrator.tuning.calibrate import cache_path, calibration_key
    from orchestrator.tuning.study import fixed_configs

    spec = load_space("search_spaces/intra_domain_cpu.yaml")
    configs = fixed_configs(spec)
    key = calibration_key(spec, configs, steps=3, items=16)
    assert key["cpu"]["model"] == cpu_info()["model"] and key["cpu"]["flags"] == cpu_info()["flags"]
    assert (key["model"], key["batch_size"], key["threads"]) == ("smollm2-135m-instruct", 32, 1)
    other_cpu = {**key, "cpu": {**key["cpu"], "flags": []}}
    other_configs = calibration_key(spec, {**configs, "lora": {**configs["lora"], "lora.r": 16}}, steps=3, items=16)
    two_slots = calibration_key(spec, configs, steps=3, items=16, slots=2)   # rates plus the slowdown of 2 at once
    paths = {cache_path(key), cache_path(other_cpu), cache_path(other_configs), cache_path(two_slots)}
    assert len(paths) == 4 and cache_path(dict(key)) == cache_path(key) and "slots" not in key
