"""The search's report: every trial, the front, what matters per method, the seesaw across trials, the ties.

Written by ``python -m orchestrator.search`` into ``<storage>/<name>/report`` (and ``--out DIR``) and logged as the
parent MLflow run's ``report/`` artifacts. Everything is read from the trial rows (``summary.trial_rows``: the
trials' last Tune results), so the report is rebuilt from a finished or interrupted search alike, without Ray.

Ties. Two trials scored on the same val items are compared by their paired difference. For task ``t`` with
``I_t`` items and correctness ``a_i, b_i ∈ {0, 1}``, ``d_t = mean_i(a_i - b_i)`` with ``SE_t² = s_t² / I_t``
(``s_t²`` the sample variance of ``a_i - b_i``); the mean over ``T`` tasks has ``D = mean_t d_t`` and
``SE = sqrt(Σ_t SE_t²) / T``. A trial whose ``|D| <= z · SE`` (z = 1.96) from its method's best is not
distinguishable from it. Without per-item val answers (``val_correct/<task>`` in the trial's result) the SE falls
back to two independent binomials, ``SE_t² = (p_a (1 - p_a) + p_b (1 - p_b)) / I_t``: larger than the paired SE
whenever the two trials agree on items more than chance would (the usual case), so it calls more ties; the
report says which was used.

Seesaw across trials: per task, its val accuracy against the trial's mean (slope by least squares), and the
Spearman rank correlation of the tasks' accuracies over the trials (which tasks move together, which trade off).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.evaluation.statistics import seed_t
from orchestrator.report import pareto
from orchestrator.spec.space import SearchSpec

Z = 1.96
METRIC = "val/mean_acc"
FROM_SEARCH = ("`python -m orchestrator.study --from-search` takes, per method, the completed trial with the highest "
               "final val mean accuracy (the first one reached on an exact tie) and ignores the ties listed here: "
               "they are equally supported by val, and the study's seeds decide between methods, not between them")


def tasks_of(rows: list[dict]) -> list[str]:
    """Task names that the rows report a val accuracy for (``val/primary/<task>``, else ``val/acc/<task>``)."""
    names = {k.split("/", 2)[2] for r in rows for k in r if k.startswith(("val/primary/", "val/acc/"))}
    return sorted(names)


def task_acc(row: dict, task: str) -> float:
    """The task's primary val accuracy (what ``val/mean_acc`` averages), else its ``acc``."""
    value = row.get(f"val/primary/{task}", row.get(f"val/acc/{task}"))
    return float(value) if isinstance(value, (int, float)) else math.nan


def malora_dims_of(hp: dict, num_experts: int = 8) -> tuple[int, int] | None:
    """MALoRA's (d, r_bar) from its searched hyperparameters: lam with r, or d (with r)."""
    r = hp.get("r", 8)
    if "lam" in hp:
        return round(hp["lam"] * r * num_experts), round((2 - hp["lam"]) * r)
    if "d" in hp:
        return int(hp["d"]), int(hp.get("r_bar", 2 * r - hp["d"] // num_experts))
    return None


def rungs(grace: int, eta: int, max_t: int) -> list[int]:
    """ASHA's milestones below ``max_t`` evaluations: ``grace · eta^k`` (Ray's ``AsyncHyperBandScheduler``)."""
    out, t = [], grace
    while t < max_t:
        out.append(t)
        t *= eta
    return out


def rung(row: dict, milestones: list[int], max_t: int) -> int:
    """The last ASHA milestone (evaluations) the trial reached, or ``max_t`` when it ran its whole budget."""
    done = int(row.get("evaluations") or 0)
    if done >= max_t:
        return max_t
    reached = [m for m in milestones if m <= done]
    return reached[-1] if reached else 0


def trial_table(rows: list[dict], milestones: list[int], max_t: int) -> list[dict[str, Any]]:
    """One flat record per trial: hyperparameters as ``hp/<name>`` (MALoRA with its d, r_bar), trainable count and
    share, val accuracy per task and mean, real tokens/s, the ASHA rung reached (``milestones``: its rungs in
    evaluations, ``max_t`` the whole budget), state, ``routing/mi*`` where logged, test where scored."""
    tasks = tasks_of(rows)
    out = []
    for r in rows:
        hp = dict(r.get("hparams") or {})
        if r["method"] == "malora" and (dims := malora_dims_of(hp)):
            hp["d"], hp["r_bar"] = dims
        rec = {"trial_id": r["trial_id"], "method": r["method"], "state": r["status"],
               **{f"hp/{k}": (list(v) if isinstance(v, tuple) else v) for k, v in sorted(hp.items())},
               "trainable_params": r.get("trainable_params"), "trainable_share": r.get("trainable_share"),
               **{f"val/{t}": task_acc(r, t) for t in tasks}, METRIC: r.get(METRIC),
               "tokens_per_s": r.get("tokens_per_s"), "evaluations": r.get("evaluations"),
               "asha_rung": rung(r, milestones, max_t), "step": r.get("step"),
               "val_history": r.get("val_history") or {},
               **{k: v for k, v in sorted(r.items()) if k.startswith("routing/mi")},
               **{k: v for k, v in sorted(r.items()) if k.startswith("test/") and k.count("/") <= 2
                  and not k.startswith(("test/acc_norm/", "test/primary/"))},
               "per_item_val": all(isinstance(r.get(f"val_correct/{t}"), list) for t in tasks) and bool(tasks),
               "error": r.get("error", "")}
        out.append(rec)
    return out


# --------------------------------------------------------------------------------------------------- ties
def paired_difference(a: dict, b: dict, tasks: list[str], n_items: dict[str, int]) -> tuple[float, float, bool]:
    """(D, SE, paired) of trial a minus trial b on the mean over tasks (module docstring): paired on the same val
    items, the one-seed paired t of ``statistics.seed_t``; without per-item answers, two binomials."""
    paired = all(isinstance(r.get(f"val_correct/{t}"), list) and len(r[f"val_correct/{t}"]) > 1
                 for r in (a, b) for t in tasks)
    if paired:
        test = seed_t({t: [a[f"val_correct/{t}"]] for t in tasks}, {t: [b[f"val_correct/{t}"]] for t in tasks})
        return test.mean, test.se, True
    diffs, var = [], 0.0
    for t in tasks:
        pa, pb, n = task_acc(a, t), task_acc(b, t), max(1, n_items.get(t, 1))
        diffs.append(pa - pb)
        var += (pa * (1 - pa) + pb * (1 - pb)) / n
    return float(np.mean(diffs)), math.sqrt(var) / len(tasks), False


def ties(rows: list[dict], n_items: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per method: its best completed trial on val, and each other completed trial's D, SE and whether it ties."""
    tasks = tasks_of(rows)
    complete = [r for r in rows if r["status"] == "TERMINATED" and isinstance(r.get(METRIC), (int, float))
                and math.isfinite(r[METRIC])]
    out = {}
    for best in pareto.best_per_method(complete, METRIC, "max"):
        others = []
        for r in complete:
            if r["method"] != best["method"] or r is best:
                continue
            d, se, paired = paired_difference(best, r, tasks, n_items)
            others.append({"trial_id": r["trial_id"], METRIC: r[METRIC], "diff": d, "se": se, "paired": paired,
                           "tie": abs(d) <= Z * se})
        tied = [o["trial_id"] for o in others if o["tie"]]
        out[best["method"]] = {"best": best["trial_id"], "z": Z, METRIC: best[METRIC], "ties": tied, "others": others,
                               "paired": all(o["paired"] for o in others) if others else None,
                               "verdict": (f"tie: {len(tied)} other trial(s) within {Z} SE of the best" if tied
                                           else "clear: no other trial within 1.96 SE" if others else
                                           "only one completed trial")}
    return out


# -------------------------------------------------------------------------------------------------- seesaw
def task_matrix(rows: list[dict]) -> tuple[list[str], np.ndarray]:
    """(tasks, (trials, tasks) val accuracies) of the trials that have every task's val accuracy."""
    tasks = tasks_of(rows)
    if not tasks:
        return [], np.zeros((0, 0))
    use = [[task_acc(r, t) for t in tasks] for r in rows]
    return tasks, np.array([a for a in use if all(math.isfinite(x) for x in a)], float).reshape(-1, len(tasks))


def seesaw(rows: list[dict]) -> dict[str, Any]:
    """Across trials with every task's val accuracy: each task's slope against the trial mean, and the Spearman
    rank correlation matrix of the tasks (``nan`` where a task is constant over the trials)."""
    from scipy import stats

    tasks, acc = task_matrix(rows)  # (trials, tasks)
    if len(acc) < 3 or len(tasks) < 2:
        return {"tasks": tasks, "trials": len(acc), "slopes": {}, "spearman": None}
    mean = acc.mean(axis=1)
    slopes = {t: float(np.polyfit(mean, acc[:, j], 1)[0]) if np.ptp(mean) > 0 else math.nan
              for j, t in enumerate(tasks)}
    rho = np.full((len(tasks), len(tasks)), math.nan)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            if np.ptp(acc[:, i]) > 0 and np.ptp(acc[:, j]) > 0:
                rho[i, j] = stats.spearmanr(acc[:, i], acc[:, j]).statistic
    return {"tasks": tasks, "trials": len(acc), "slopes": slopes, "spearman": rho.tolist(),
            "rho_critical": rho_critical(len(acc))}


def rho_critical(n: int, alpha: float = 0.05) -> float:
    """|ρ| a rank correlation over ``n`` trials must exceed to differ from 0 at two-sided ``alpha``, by the t
    approximation ``t = ρ sqrt((n - 2) / (1 - ρ²))`` with n - 2 df, i.e. ``ρ = t / sqrt(n - 2 + t²)``."""
    from scipy import stats

    t = stats.t.ppf(1 - alpha / 2, n - 2)
    return float(t / math.sqrt(n - 2 + t * t))


# --------------------------------------------------------------------------------------------- importances
def common_budget(rows: list[dict], budgets: list[int], least: int = 3) -> int | None:
    """The largest budget (evaluations, from ``budgets``) at which ``least`` or more of the rows have a val mean
    accuracy (``val_history``): ASHA stops most trials early, so the full budget alone may hold one or two; at an
    earlier rung every trial that reached it is compared at the same training."""
    for b in sorted(budgets, reverse=True):
        if sum(isinstance((r.get("val_history") or {}).get(b), float) for r in rows) >= least:
            return b
    return None


def method_study(spec: SearchSpec, method: str, rows: list[dict], budget: int | None = None):
    """An in-memory Optuna study of the method's trials (their searched hyperparameters, and as value the val mean
    accuracy after ``budget`` evaluations; None: the completed trials' final value), rebuilt from the rows so that
    it needs neither Ray nor the journal files."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {}
    for name, dom in spec.method(method).hparams:
        if dom.kind == "choice":
            dists[name] = optuna.distributions.CategoricalDistribution(list(dom.values))
        elif dom.kind in ("uniform", "loguniform"):
            dists[name] = optuna.distributions.FloatDistribution(dom.low, dom.high, log=dom.kind == "loguniform")
        elif dom.kind in ("int", "logint"):
            dists[name] = optuna.distributions.IntDistribution(dom.low, dom.high, log=dom.kind == "logint")
    study = optuna.create_study(direction="maximize", study_name=method)
    for r in rows:
        value = (r.get("val_history") or {}).get(budget) if budget is not None else (
            r.get(METRIC) if r["status"] == "TERMINATED" else None)
        if r["method"] != method or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        params = {k: v for k, v in (r.get("hparams") or {}).items() if k in dists}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  value=float(value)))
    return study


def importances(study, budget: int | None = None) -> tuple[dict[str, float], str]:
    """Optuna's fANOVA importances of the study's parameters for val mean accuracy, with the caveat to print."""
    import optuna

    n = len(study.trials)
    at = f" at {budget} evaluation(s)" if budget is not None else ""
    if n < 3 or not study.trials[0].params:
        return {}, f"not computed: {n} trial(s) with a val score{at}"
    try:
        values = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as exc:  # e.g. every trial scored the same: no variance to attribute
        return {}, f"not computed over {n} trials{at}: {exc}"
    caveat = (f"fANOVA over {n} trials{at}: a random forest fit to {n} points, so an importance below ~0.2 is not "
              "told apart from none, and an ordering of close values is not a finding" if n < 30 else
              f"fANOVA over {n} trials{at}")
    return {k: float(v) for k, v in values.items()}, caveat


def write_report(spec: SearchSpec, rows: list[dict], front_ids: set[str], folder: str | Path, *,
                 provenance: dict[str, Any], n_items: dict[str, int], milestones: list[int], max_t: int) -> list[Path]:
    """Every file of the report into ``folder``; returns their paths (module docstring; report.md indexes them).

    ``provenance``: the command, commit, machine, precision and wall time (``tuning.run``); ``n_items``: val items
    per task; ``milestones``, ``max_t``: ASHA's rungs and the whole budget, in evaluations."""
    from orchestrator.report import plots, search_plots

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = trial_table(rows, milestones, max_t)
    columns = tuple(dict.fromkeys(k for rec in table for k in rec))
    files = [pareto.write_csv(table, folder / "trials.csv", columns)]
    (folder / "trials.json").write_text(json.dumps(table, indent=1, default=str))
    files.append(folder / "trials.json")
    tie = ties(rows, n_items)
    saw = seesaw(rows)
    budgets = {m.kind: common_budget([r for r in rows if r["method"] == m.kind], [*milestones, max_t])
               for m in spec.methods}
    studies = {k: method_study(spec, k, rows, b) for k, b in budgets.items()}
    imp = {k: importances(s, budgets[k]) for k, s in studies.items()}
    drawn = [r for r in rows if isinstance(r.get(METRIC), (int, float)) and math.isfinite(r[METRIC])
             and isinstance(r.get("trainable_params"), (int, float))]
    if drawn:
        files.append(plots.pareto_plot(drawn, front_ids, folder / "front.png", METRIC))
    files += search_plots.method_plots(studies, folder, METRIC)
    at = budgets.get("malora")  # the surface at one budget: the rung most MALoRA trials share
    surface = [(dims[0], r["hparams"]["beta"], value, r["trial_id"]) for r in rows
               if r["method"] == "malora" and "beta" in (r.get("hparams") or {}) and (dims := malora_dims_of(
                   r["hparams"])) and isinstance(value := (r.get("val_history") or {}).get(at), float)]
    files += [p for p in (search_plots.malora_surface(surface, tie.get("malora"), folder / "malora_d_beta.png",
                                                      at),
                          search_plots.seesaw_plot(task_matrix(rows)[1], saw, folder / "seesaw.png")) if p is not None]
    summary = {"ties": tie, "seesaw": saw, "importances": {k: {"values": v, "caveat": c} for k, (v, c) in imp.items()},
               "front": sorted(front_ids), "budgets": budgets, "provenance": provenance, "from_search": FROM_SEARCH}
    (folder / "report.json").write_text(json.dumps(summary, indent=1, default=str))
    (folder / "report.md").write_text(report_markdown(spec, table, summary, [f.name for f in files]))
    return files + [folder / "report.json", folder / "report.md"]


# ------------------------------------------------------------------------------------------------ markdown
def _pct(v: Any) -> str:
    return f"{100 * v:.1f}" if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def _launch_commits(prov: dict[str, Any]) -> str:
    """The launches' commits where any differs from the report's (a trial runs the code of its launch)."""
    launches = prov.get("launches") or []
    if not any(x.get("commit") not in (None, prov.get("commit")) for x in launches):
        return ""
    return "; the launches ran " + ", ".join(
        f"{i}: `{str(x.get('commit') or '?')[:7]}`" + ("+" if x.get("dirty") else "")
        for i, x in enumerate(launches, 1)) + " (+: uncommitted changes)"


def _wall(prov: dict[str, Any]) -> str:
    """The running time over every launch and, when it was resumed, the span from the first launch."""
    wall, launches = prov.get("wall_s"), prov.get("launches") or []
    if not isinstance(wall, (int, float)) or ("launches" in prov and not launches):
        return "not recorded (no clock: the search ran before it kept one)"
    text = f"{wall:.0f} s ({wall / 60:.1f} min) of running time"
    if len(launches) > 1:
        text += (f" over {len(launches)} launches (" + ", ".join(f"{x['running_s'] / 60:.1f}" for x in launches)
                 + f" min), {prov.get('elapsed_s', 0) / 60:.1f} min from the first launch to the last")
    return text


def _machine(m: Any) -> str:
    """One line from ``models.hardware.machine_info()`` (CPU model, logical CPUs, bf16 flags, GPUs, torch)."""
    if not isinstance(m, dict) or not isinstance(m.get("cpu"), dict):
        return str(m)
    cpu = m["cpu"]
    flags = [f for f in cpu.get("flags") or () if "bf16" in f or f in ("avx2", "avx512f")]
    gpus = ", ".join(g["name"] if isinstance(g, dict) else str(g) for g in m.get("gpus") or ()) or "no GPU"
    return (f"{cpu.get('model')} ({cpu.get('logical_cpus')} logical CPUs; {' '.join(flags) or 'no avx2/bf16 flags'})"
            f", {gpus}, torch {m.get('torch')}, {m.get('os')}")


def report_markdown(spec: SearchSpec, table: list[dict], summary: dict[str, Any], files: list[str]) -> str:
    """report.md: provenance, the front, the chosen trials with their ties and test, importances, the (d, beta)
    surface, the seesaw across trials, and every trial."""
    prov, tie, saw = summary["provenance"], summary["ties"], summary["seesaw"]
    by_id = {r["trial_id"]: r for r in table}
    hp = lambda r: " ".join(f"{k[3:]}={pareto._fmt(v)}" for k, v in r.items() if k.startswith("hp/"))  # noqa: E731
    out = [f"# Search report: {spec.name}", "",
           f"- command: `{prov['command']}`" if prov.get("command") else "- command: not recorded",
           *([f"- report written again by: `{prov['report_command']}` (no training)"] if prov.get("report_command")
             else []),
           f"- commit: `{prov.get('commit')}`" + (" (uncommitted changes in the tree)" if prov.get("dirty") else "")
           + _launch_commits(prov),
           f"- machine: {_machine(prov.get('machine'))}",
           f"- precision: train {', '.join(prov.get('precision') or ['?'])}, "
           f"eval {', '.join(prov.get('eval_precision') or ['?'])}",
           f"- wall time: {_wall(prov)}",
           f"- trials: {len(table)} (" + ", ".join(f"{s} {sum(r['state'] == s for r in table)}"
                                                   for s in ("TERMINATED", "STOPPED", "ERROR"))
           + "); `trials.csv`, `trials.json`",
           "", "## Front: val mean accuracy against trainable parameters", "",
           "Every trial with a val score is drawn (hollow: not on the front); the front of the completed trials is "
           "the staircase of the best val accuracy each budget attains.", "", "![front](front.png)", "",
           "| trial | method | hyperparameters | trainable | share % | val mean % | test mean % |",
           "|---|---|---|---|---|---|---|"]
    for tid in summary["front"]:
        r = by_id[tid]
        out.append(f"| {tid} | {r['method']} | {hp(r)} | {r['trainable_params']:,} | {_pct(r['trainable_share'])} "
                   f"| {_pct(r[METRIC])} | {_pct(r.get('test/mean_acc'))} |")
    out += ["", "## Chosen per method, and its ties", "",
            f"Best completed trial per method on val; a trial ties it when |D| <= {Z} SE of the paired difference on "
            "the same val items (module docstring of `orchestrator.report.search_report`). Test is scored once, "
            "after choosing, for the chosen trials only.", "",
            "| method | best | val mean % | test mean % | verdict | tied trials (D ± SE, points) | SE from |",
            "|---|---|---|---|---|---|---|"]
    for method, t in tie.items():
        best = by_id[t["best"]]
        tied = ", ".join(f"{o['trial_id']} ({100 * o['diff']:+.1f} ± {100 * o['se']:.1f})" for o in t["others"]
                         if o["tie"]) or "–"
        source = "–" if t["paired"] is None else ("per-item answers (paired)" if t["paired"] else
                                                  "accuracies only (independent binomials: more ties)")
        out.append(f"| {method} | {t['best']} | {_pct(best[METRIC])} | {_pct(best.get('test/mean_acc'))} | "
                   f"{t['verdict']} | {tied} | {source} |")
    out += ["", f"When the best is one of a tie: {summary['from_search']}.", "", "## What matters, per method", ""]
    for method, imp in summary["importances"].items():
        values = ", ".join(f"{k} {v:.2f}" for k, v in imp["values"].items()) or "–"
        out.append(f"- **{method}**: {values} ({imp['caveat']})")
        out += [f"  ![{f}]({f})" for f in files if f in (f"slice_{method}.png", f"contour_{method}.png")]
    if "malora_d_beta.png" in files:
        out += ["", "## MALoRA's (d, β) surface", "",
                f"Val mean accuracy after {summary['budgets'].get('malora')} evaluation(s) (the budget most MALoRA "
                "trials reached) over d = λ·r·N and β (the paper's Fig. 4(b) at this scale); the val noise, z·SE of "
                "a paired difference, is drawn as the band below the best.", "", "![malora](malora_d_beta.png)"]
    out += ["", "## Seesaw across trials", ""]
    if saw["spearman"] is None:
        out.append(f"Not computed: {saw['trials']} trial(s) with every task's val accuracy (needs 3).")
    else:
        tasks = saw["tasks"]
        crit = saw.get("rho_critical")
        out += [f"Over {saw['trials']} trials, each at its last evaluation (a trial ASHA stopped, at its rung): each "
                "task's val accuracy against the trial's mean (slope: points of the task per point of the mean; 1 = "
                "moves with the mean), and the Spearman rank correlation of the tasks' accuracies (negative: the "
                "tasks trade off)" + (f"; over {saw['trials']} trials |ρ| must exceed {crit:.2f} to differ from 0 "
                                      "at 5 % (one pair; uncorrected for the pairs)" if crit else "") + ".",
                "", "![seesaw](seesaw.png)", "",
                "| task | slope vs mean | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        for i, t in enumerate(tasks):
            out.append(f"| {t} | {saw['slopes'][t]:.2f} | " + " | ".join(
                "–" if not math.isfinite(v) else f"{v:+.2f}" for v in saw["spearman"][i]) + " |")
    mi = [r for r in table if isinstance(r.get("routing/mi"), (int, float))]
    if mi:
        out += ["", "## Routing: I(task; expert) per trial", "", "| trial | method | routing/mi (bits) | val mean % |",
                "|---|---|---|---|"] + [f"| {r['trial_id']} | {r['method']} | {r['routing/mi']:.3f} | "
                                         f"{_pct(r[METRIC])} |" for r in mi]
    out += ["", "## Every trial", "", "| trial | method | state | rung | hyperparameters | trainable | val mean % | "
            "tokens/s |", "|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['trial_id']} | {r['method']} | {r['state']} | {r['asha_rung']} | {hp(r)} | "
            f"{pareto._fmt(r['trainable_params'])} | {_pct(r[METRIC])} | {pareto._fmt(r['tokens_per_s'])} |"
            for r in table]
    return "\n".join(out) + "\n"
