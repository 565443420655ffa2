"""The learned-per-item check on hand-built item lists."""
from __future__ import annotations

import math

import pytest

from orchestrator.evaluation.changes import item_changes


def test_changes_counted_by_hand():
    # 5 items, gold = [0, 1, 2, 0, 1]; zero-shot picks [0, 0, 0, 0, 0] -> right on items 0 and 3
    gold = [0, 1, 2, 0, 1]
    zero = [0, 0, 0, 0, 0]
    seed_a = [0, 1, 1, 2, 0]  # item 1 -> gold, item 2 -> another wrong one, item 3 -> away from gold
    seed_b = [0, 1, 2, 0, 0]  # items 1 and 2 -> gold
    correct = lambda ch: [int(c == g) for c, g in zip(ch, gold)]  # noqa: E731
    r = item_changes(zero, correct(zero), [seed_a, seed_b], [correct(seed_a), correct(seed_b)])
    assert (r.n_items, r.n_seeds) == (5, 2)
    assert r.changed == pytest.approx((3 / 5 + 2 / 5) / 2)
    assert r.to_gold == pytest.approx((1 / 5 + 2 / 5) / 2)
    assert r.from_gold == pytest.approx((1 / 5 + 0) / 2)
    assert r.to_gold_of_changed == pytest.approx(0.3 / 0.5)
    assert r.as_dict()["to_gold_of_changed"] == pytest.approx(0.6)


def test_a_prior_moves_items_but_not_to_gold():
    gold = [0, 1, 0, 1]
    zero = [0, 1, 0, 1]  # all right zero-shot
    prior = [1, 1, 1, 1]  # a constant answer after training
    r = item_changes(zero, [1, 1, 1, 1], prior, [int(c == g) for c, g in zip(prior, gold)])
    assert r.changed == 0.5 and r.to_gold == 0.0 and r.from_gold == 0.5


def test_nothing_changed_and_shape_errors():
    r = item_changes([1, 2], [0, 1], [[1, 2]], [[0, 1]])
    assert r.changed == 0.0 and math.isnan(r.to_gold_of_changed)
    with pytest.raises(ValueError, match="item vectors disagree"):
        item_changes([1, 2], [0, 1], [[1, 2, 3]], [[0, 1, 0]])


def test_the_study_report_carries_the_check_per_method_and_task(shared_data_dir, tmp_path):
    import dataclasses

    from orchestrator.report import study_report
    from orchestrator.spec.space import load_space

    spec = load_space("search_spaces/intra_domain_cpu.yaml")
    spec = dataclasses.replace(spec, methods=tuple(m for m in spec.methods if m.kind == "lora"),
                               study=dataclasses.replace(spec.study, n_boot=200, single_task=False),
                               storage_path=str(tmp_path))
    gold, zero = [0, 1, 2, 0], [0, 0, 0, 0]
    seeds = [[0, 1, 2, 1], [0, 1, 0, 0]]  # seed 0: two to gold, one away; seed 1: one to gold
    runs = [{"run": {"role": "replicate", "method": "lora", "seed": s, "task": None},
             "metrics": {"trainable_params": 1, "trainable_share": 0.1, "test/mean_acc": 0.0,
                         "test_correct/piqa": [int(c == g) for c, g in zip(ch, gold)], "test_chosen/piqa": ch,
                         "test_sha256/piqa": "x"}}
            for s, ch in enumerate(seeds)]
    reference = {"test_correct": {"piqa": [int(c == g) for c, g in zip(zero, gold)]}, "test_chosen": {"piqa": zero}}
    splits = {"piqa": {"train": 1, "val": 1, "test": 4, "test_sha256": "x", "test_majority": 0.5}}
    res = study_report.build_results(spec, {"lora": {"method": "lora"}}, runs, reference, splits, wall_s=1.0,
                                     command="cmd")
    check = res["methods"]["lora"]["learned_per_item"]["piqa"]
    assert check["changed"] == (3 / 4 + 1 / 4) / 2 and check["to_gold"] == (2 / 4 + 1 / 4) / 2
    assert check["from_gold"] == (1 / 4 + 0) / 2
    assert "learned per item, lora" in study_report.markdown(res) and "piqa 50.0 / 37.5 %" in study_report.markdown(res)
