"""The Pareto front of a hand-made set of points against a brute-force dominance check written here, and its
staircase (the attainment boundary, not straight segments between the points)."""

from __future__ import annotations

import itertools

from orchestrator.report.pareto import pareto_front, staircase

OBJ = {"val/mean_acc": "max", "trainable_params": "min"}


def row(tid, acc, params, method="malora"):
    return {"trial_id": tid, "method": method, "val/mean_acc": acc, "trainable_params": params}


def brute_force(rows):
    """Ids of the rows no other row beats: >= on accuracy and <= on params, with one strict."""
    out = set()
    for a in rows:
        beaten = False
        for b in rows:
            if b is a:
                continue
            no_worse = b["val/mean_acc"] >= a["val/mean_acc"] and b["trainable_params"] <= a["trainable_params"]
            better = b["val/mean_acc"] > a["val/mean_acc"] or b["trainable_params"] < a["trainable_params"]
            beaten |= no_worse and better
        if not beaten:
            out.add(a["trial_id"])
    return out


POINTS = [row("a", 0.50, 100), row("b", 0.60, 200), row("c", 0.60, 200),   # b, c: an exact tie, both on it
          row("d", 0.55, 300),                                             # dominated by b (and c)
          row("e", 0.70, 400), row("f", 0.70, 500),                        # f: same accuracy, more params
          row("g", 0.40, 100),                                             # same params as a, less accurate
          row("h", 0.45, 50), row("i", float("nan"), 10)]                  # i: no score, never on the front


def test_front_matches_brute_force_with_ties_and_dominated_points():
    front = pareto_front(POINTS, OBJ)
    finite = [r for r in POINTS if r["val/mean_acc"] == r["val/mean_acc"]]
    assert {r["trial_id"] for r in front} == brute_force(finite) == {"h", "a", "b", "c", "e"}
    assert [r["trial_id"] for r in front][:1] == ["e"]  # sorted by the first objective, best first


def test_front_of_a_single_method_and_every_subset_agree_with_brute_force():
    finite = [r for r in POINTS if r["trial_id"] != "i"]
    for k in (1, 2, 3, 4):
        for subset in itertools.combinations(finite, k):
            assert {r["trial_id"] for r in pareto_front(list(subset), OBJ)} == brute_force(list(subset))
    one = [row("x", 0.5, 10, "lora")]
    assert [r["trial_id"] for r in pareto_front(one, OBJ)] == ["x"]


def test_staircase_holds_each_accuracy_until_the_next_budget():
    front = [row("h", 0.45, 50), row("a", 0.50, 100), row("e", 0.70, 400)]
    xs, ys = staircase(list(reversed(front)), "trainable_params", "val/mean_acc", x_end=500)
    # drawn with where="post": y_i holds on [x_i, x_{i+1}); the last step runs to x_end
    assert (xs, ys) == ([50, 100, 400, 500], [0.45, 0.50, 0.70, 0.70])
    # an exact tie on the front is one corner of the staircase, twice
    xs, ys = staircase([row("b", 0.6, 200), row("c", 0.6, 200)], "trainable_params", "val/mean_acc")
    assert (xs, ys) == ([200, 200], [0.6, 0.6])


def test_pareto_png_draws_the_front_as_a_staircase(monkeypatch, tmp_path):
    from orchestrator.report import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    rows = [row("h", 0.45, 50), row("a", 0.50, 100), row("e", 0.70, 400), row("d", 0.55, 800)]
    plots.pareto_plot(rows, {"h", "a", "e"}, tmp_path / "pareto.png")
    (line,) = [ln for ln in figures[0].axes[0].get_lines() if ln.get_label() == "Pareto front"]
    # a step held until the next budget (was: straight segments between the front's points)
    assert line.get_drawstyle() == "steps-post"
    assert list(line.get_xdata()) == [50, 100, 400, 800] and list(line.get_ydata()) == [0.45, 0.50, 0.70, 0.70]
    # one legend entry per method however its trials are drawn; an ASHA-stopped trial as a triangle
    stopped = {**row("s", 0.40, 60), "status": "STOPPED"}
    plots.pareto_plot([*rows, stopped], {"h", "a", "e"}, tmp_path / "pareto.png")
    ax = figures[1].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == len(set(labels)) and "stopped early (val at its rung)" in labels
    offsets = [tuple(c.get_offsets()[0]) for c in ax.collections if len(c.get_offsets()) == 1]
    assert (60.0, 0.40) in offsets and len(ax.collections) == 3   # on the front, off it, stopped
