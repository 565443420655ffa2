"""Search spaces: every shipped YAML validates; each validation rule has its own error; the conditional
Optuna space (define-by-run, real optuna Study, no Ray) only ever produces the chosen method's parameters."""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import yaml

from orchestrator import search
from orchestrator.spec.hparams import (ConditionalSpace, adapter_config, expert_schedule, optuna_points,
                                  schedule_factor, trial_hparams)
from orchestrator.spec.space import SpaceError, load_space, model_params_hint, numeric_string_fix, spec_from_dict

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"
SHIPPED = sorted(SPACES.glob("*.yaml"))


@pytest.fixture(autouse=True)
def _data_dir(shared_data_dir, monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))


def smoke_raw() -> dict:
    return yaml.safe_load((SPACES / "smoke.yaml").read_text())


def test_three_spaces_are_shipped():
    assert {p.name for p in SHIPPED} >= {"smoke.yaml", "intra_domain.yaml", "inter_domain.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
@pytest.mark.parametrize("smoke", [False, True])
def test_shipped_space_validates(path, smoke, shared_data_dir):
    spec = load_space(path, smoke_test=smoke)
    assert spec.name == path.stem
    assert Path(spec.data.data_dir) == shared_data_dir.resolve()
    assert spec.methods and all(m.hparams for m in spec.methods)
    assert Path(spec.storage_path).is_absolute()
    if smoke:
        assert spec.train.max_steps is not None and spec.train.max_steps <= 8
        assert spec.search.num_trials <= 4


def test_intra_domain_has_the_paper_methods_and_ranges():
    spec = load_space(SPACES / "intra_domain.yaml")
    assert [m.kind for m in spec.methods] == ["lora", "molora", "malora", "mosld"]
    malora = dict(spec.method("malora").hparams)
    # the paper's sweeps (METHODS.md Tables 11-12): beta 0.5-2.0; at r = 8, lam 0.25..1 gives d = 16..64
    assert malora["beta"].values == (0.5, 2.0) and malora["lam"].values == (0.25, 0.5, 0.75, 1.0)
    assert 8 in malora["r"].values and malora["lr"].kind == "loguniform"
    assert spec.search.points_to_evaluate[0] == {"method": "malora", "r": 8, "lam": 0.5, "beta": 1.25, "top_k": 2,
                                                 "lr": 4.0e-4}
    assert spec.objectives == {"val/mean_acc": "max", "trainable_params": "min"} and not spec.search.match_budget
    # MoSLD on the same six projections as the others
    assert dict(spec.method("mosld").hparams)["target_modules"].low == dict(
        spec.method("lora").hparams)["target_modules"].low
    assert spec.data.suite == "intra_domain" and spec.model.name == "smollm2-135m-instruct"
    smoke = load_space(SPACES / "intra_domain.yaml", smoke_test=True)
    assert (smoke.train.max_steps, smoke.search.num_trials, smoke.data.val_limit, smoke.data.test_limit) == (6, 4, 12, 12)


def test_cpu_search_has_the_mission_knobs_at_the_cpu_study_size():
    spec, study = load_space(SPACES / "intra_domain_cpu_search.yaml"), load_space(SPACES / "intra_domain_cpu.yaml")
    assert spec.model == study.model and spec.train.precision == "auto" and spec.data.formulation == "cloze"
    assert (spec.train.max_steps, spec.train.batch_size, spec.data.train_limit, spec.data.split_seed) == (
        study.train.max_steps, study.train.batch_size, study.data.train_limit, study.data.split_seed)
    searched = {m.kind: {n for n, d in m.hparams if d.kind != "const"} for m in spec.methods}
    assert searched == {"lora": {"r", "lr"}, "molora": {"r", "top_k", "lr"},
                        "malora": {"r", "lam", "beta", "top_k", "lr"},
                        "mosld": {"r", "expert_schedule", "top_k", "lr"}}
    assert spec.search.num_trials % 4 == 0 and spec.search.asha.enabled


def test_inter_domain_is_multi_objective():
    spec = load_space(SPACES / "inter_domain.yaml")
    assert spec.search.sampler == "tpe"  # multi-objective TPE: NSGA-II cannot model several methods
    assert spec.objectives == {"val/mean_acc": "max", "trainable_params": "min"}
    assert spec.train.epochs == 1.0 and spec.train.max_steps is None


def _set(raw: dict, dotted: str, value) -> dict:
    raw = copy.deepcopy(raw)
    *head, last = dotted.split(".")
    node = raw
    for key in head:
        node = node.setdefault(key, {})
    if value is _DELETE:
        node.pop(last)
    else:
        node[last] = value
    return raw


_DELETE = object()
BAD = [
    ("trian", {}, r"trian: unknown key \(did you mean 'train'\?\)"),
    ("train.lr", "1e-5", r"train\.lr: '1e-5' is a string.*Fix: write 1\.0e-5"),
    ("train.batch_size", 0, r"train\.batch_size: 0 is impossible\. Fix: use a value >= 1"),
    ("train.batch_size", "eight", r"train\.batch_size: 'eight' must be of type int"),
    ("train.warmup_ratio", 1.5, r"train\.warmup_ratio: 1\.5 is impossible"),
    ("train.epochs", 2.0, r"exactly one of train\.max_steps or train\.epochs"),
    ("train.precision", "fp16", r"train\.precision: 'fp16' needs a GPU"),
    ("train.shedule", "cosine", r"train\.shedule: unknown key \(did you mean 'schedule'\?\)"),
    ("search.sampler", "tpee", r"search\.sampler: 'tpee' is not allowed \(did you mean 'tpe'\?\)"),
    ("search.objectives", {"val/mean_acc": "up"}, r"search\.objectives: .* must map metric names to max\|min"),
    ("search.objectives", {"test/mean_acc": "max"}, r"search\.objectives\.test/mean_acc: test metrics are held out"
                                                   r".*Fix: use the validation metric 'val/mean_acc'"),
    ("search.objectives", {"mean_acc": "max"}, r"search\.objectives\.mean_acc: renamed to 'val/mean_acc'"),
    ("search.objectives", {"val/acc/piqa": "max"}, r"search\.objectives\.val/acc/piqa: not reported by trials"),
    ("eval.eval_limit", 8, r"eval\.eval_limit was replaced: use data\.val_limit .* and data\.test_limit"),
    ("data.val_limit", 0, r"data\.val_limit: 0 is impossible"),
    ("eval.options", "text", r"eval\.options was replaced: use data\.formulation: cloze .* one setting now drives"),
    ("data.formulation", "mc", r"data\.formulation: 'mc' is not allowed\. Fix: use one of cloze, label"),
    ("eval.scoring", "generate", r"eval\.scoring: 'generate' decodes from the templated prompt.*data\.formulation: "
                                 r"label"),
    ("study.seeds", 0, r"study\.seeds: 0 is impossible"),
    ("study.secondary_without", ["boolx"], r"study\.secondary_without: 'boolx' is not a task of this space "
                                           r"\(boolq, arc_e\)"),
    ("study.secondary_without", ["boolq", "arc_e"], r"study\.secondary_without: leaves no task"),
    ("study.single_task_method", "hydra", r"study\.single_task_method: 'hydra' is not a method of this space"),
    ("study.comparisons", ["malora-molora"], r"study\.comparisons\[0\]: 'malora-molora' must be 'a-b'"),

    ("search.asha.grace_period", 0, r"search\.asha\.grace_period: 0 is impossible"),
    ("search.points_to_evaluate", [{"method": "hydra"}], r"points_to_evaluate\[0\]: .*needs 'method'"),
    ("search.points_to_evaluate", [{"method": "lora", "rank": 4}], r"points_to_evaluate\[0\]\.rank: unknown key"),
    ("resources.max_concurrent_trials", "many", r"max_concurrent_trials: 'many' must be a positive integer or 'auto'"),
    ("resources.cpus_per_worker", 0.005, r"cpus_per_worker: must exceed resources\.trial_driver_cpus"),
    ("resources.checkpoint_every_min", -1.0, r"resources\.checkpoint_every_min: -1\.0 is impossible"),
    ("debug.fail_mode", "segfault", r"debug\.fail_mode: 'segfault' is not allowed"),
    ("data.data_dir", "/no/such/folder", r"data\.data_dir: '/no/such/folder' -> no such folder.*MALORA_DATA_DIR"),
    ("data.suite", "intra_domain", r"data: give exactly one of data\.suite .* or data\.tasks"),
    ("data.tasks", ["boolq", "arcx"], r"data\.tasks: unknown task 'arcx'"),
    ("data.mixing", "balanced", r"data\.mixing: 'balanced' is not allowed"),
    ("methods.lorra", {"r": 4}, r"methods\.lorra: unknown key \(did you mean 'lora'\?\)"),
    ("methods.lora.rank", 4, r"methods\.lora\.rank: unknown key.*Valid keys: r, alpha"),
    ("methods.lora.lr", {"loguniform": [1.0e-2, 1.0e-4]}, r"methods\.lora\.lr\.loguniform: .* needs lo < hi"),
    ("methods.lora.lr", {"loguniform": ["1e-4", 1.0e-2]}, r"methods\.lora\.lr: '1e-4' is a string.*write 1\.0e-4"),
    ("methods.lora.r", {"normal": [1, 2]}, r"methods\.lora\.r: .* must be a constant or exactly one of"),
    ("methods.malora.top_k", 9, r"methods\.malora: MALoRAConfig\.top_k=9 is invalid: exceeds the number of experts"),
    ("methods.malora.lam", 0.5, r"methods\.malora: malora: give lam or d/r_bar, not both"),
    ("methods.malora.d", {"choice": [10, 16]}, r"methods\.malora: malora: d=10 .* no integer r_bar"),
    ("methods", {}, r"methods: must map at least one adapter kind"),
    ("debug.fail_method", "mosld", r"debug\.fail_method: 'mosld' is not a searched method"),
    ("name", "my search", r"name: 'my search' must be a folder-safe name"),
    ("search.num_trials", 3, r"search\.num_trials: 3 is not a multiple of the 2 methods \(lora, malora\).*"
                             r"Fix: num_trials: 2 or 4"),
    ("search.match_budget", True, r"methods\.lora\.r: choice \[4, 8\] is searched while search\.match_budget is "
                                  r"true.*set search\.match_budget: false"),
    ("search.budget_method", "molora", r"search\.budget_method: 'molora' is not a method of this space"),
    ("search", {"sampler": "nsga2", "match_budget": False},
     r"search\.sampler: nsga2 evolves only the parameters every trial has .*several methods \(lora, malora\).*"
     r"Fix: use tpe"),
    ("search.points_to_evaluate", [{"method": "lora", "r": 16}],
     r"points_to_evaluate\[0\]\.r: 16 is not one of the choices \[4, 8\]"),
    ("search.points_to_evaluate", [{"method": "malora", "beta": 2.0}],
     r"points_to_evaluate\[0\]\.beta: 2\.0 is outside uniform \[1\.0, 1\.5\]"),
    ("search.points_to_evaluate", [{"method": "malora", "d": 12.5}],
     r"points_to_evaluate\[0\]\.d: 12\.5 is not one of the choices \[8, 16\]"),
    ("search.points_to_evaluate", [{"method": "lora", "lr": "1e-3"}],
     r"points_to_evaluate\[0\]\.lr: '1e-3' must be a number \(write 1\.0e-3\)"),
    ("search.points_to_evaluate", [{"method": "lora", "alpha_over_r": 4.0}],
     r"points_to_evaluate\[0\]\.alpha_over_r: 4\.0 is for a constant \(methods\.lora\.alpha_over_r is fixed"),
    ("resources", {"workers_per_trial": 2, "gpus_per_worker": 0.5},
     r"resources\.gpus_per_worker: 0\.5 with workers_per_trial=2: .*NCCL refuses"),
]


@pytest.mark.parametrize("key,value,match", BAD, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD])
def test_each_bad_value_has_one_error(key, value, match):
    with pytest.raises(SpaceError, match=match) as info:
        spec_from_dict(_set(smoke_raw(), key, value), base_dir=SPACES)
    assert len(info.value.problems) == 1, info.value.problems


def test_a_method_given_as_a_scalar_is_one_problem_and_exit_2(tmp_path, capsys):
    raw = smoke_raw()
    raw["methods"] = {"lora": 8}
    raw["search"].pop("points_to_evaluate")
    with pytest.raises(SpaceError, match=r"methods\.lora: must be a mapping of hyperparameter") as info:
        spec_from_dict(raw, base_dir=SPACES)
    assert len(info.value.problems) == 1, info.value.problems
    path = tmp_path / "scalar.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert search.main(["--space", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "methods.lora: must be a mapping" in err


def test_fractional_gpus_are_fine_with_one_worker_per_trial():
    raw = _set(smoke_raw(), "resources", {"workers_per_trial": 1, "gpus_per_worker": 0.5})
    assert spec_from_dict(raw, base_dir=SPACES).resources.gpus_per_worker == 0.5
    raw = _set(smoke_raw(), "resources", {"workers_per_trial": 2, "gpus_per_worker": 1.0})
    assert spec_from_dict(raw, base_dir=SPACES).resources.workers_per_trial == 2


def test_nsga2_is_accepted_over_a_fixed_space():
    raw = smoke_raw()
    raw["methods"].pop("malora")
    raw["search"] = {"sampler": "nsga2", "num_trials": 2, "match_budget": False}
    spec = spec_from_dict(raw, base_dir=SPACES)
    assert spec.objectives == {"val/mean_acc": "max", "trainable_params": "min"}


def test_all_problems_are_collected_at_once():
    raw = smoke_raw()
    raw["trian"] = {}
    raw["train"]["lr"] = "1e-5"
    raw["eval"]["every_n_steps"] = -1
    raw["data"]["data_dir"] = "/no/such/folder"
    raw["methods"]["lora"]["rank"] = 4
    raw["search"]["sampler"] = "grid"
    with pytest.raises(SpaceError) as info:
        spec_from_dict(raw, base_dir=SPACES)
    text = str(info.value)
    assert len(info.value.problems) == 6 and text.startswith("6 problem(s)")
    for key in ("trian", "train.lr", "eval.every_n_steps", "data.data_dir", "methods.lora.rank", "search.sampler"):
        assert key in text


def test_data_dir_resolves_against_the_yaml_folder(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir("/")
    raw = _set(smoke_raw(), "data.data_dir", "data")
    raw["data"]["tasks"] = ["boolq"]
    spec = spec_from_dict(raw, base_dir=tmp_path)
    assert spec.data.data_dir == str((tmp_path / "data").resolve())


def test_default_data_dir_uses_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(tmp_path))
    spec = spec_from_dict(_set(smoke_raw(), "data.data_dir", _DELETE), base_dir=SPACES)
    assert spec.data.data_dir == str(tmp_path.resolve())


def test_numeric_string_fix():
    assert numeric_string_fix("1e-5") == "1.0e-5"
    assert numeric_string_fix("3E4") == "3.0e4"
    assert numeric_string_fix("2") == "2.0"
    assert numeric_string_fix("cosine") is None and numeric_string_fix(1e-5) is None


def test_smoke_defaults_cap_a_file_without_a_smoke_block():
    raw = _set(smoke_raw(), "train.max_steps", 500)
    raw["data"]["val_limit"] = 300
    raw["search"]["num_trials"] = 30
    spec = spec_from_dict(raw, base_dir=SPACES, smoke_test=True)
    assert (spec.train.max_steps, spec.data.val_limit, spec.search.num_trials) == (8, 16, 4)
    assert spec.data.test_limit == 8  # already below the cap: kept
    assert spec.data.train_limit == 32  # already below the cap: kept


# ------------------------------------------------------------------------------------ conditional space
def test_define_by_run_only_suggests_the_chosen_methods_parameters():
    spec = load_space(SPACES / "intra_domain.yaml")
    space = ConditionalSpace(spec.methods)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(48):
        trial = study.ask()
        constants = space(trial) or {}
        params = {**trial.params, **constants}
        method = params["method"]
        seen.add(method)
        own = {f"{method}.{n}" for n, _ in spec.method(method).hparams} | {"method"}
        assert set(params) == own, (method, set(params) ^ own)
        kind, hp = trial_hparams(spec.methods, params)
        assert kind == method
        assert ("lam" in hp) == (method == "malora") and ("beta" in hp) == (method == "malora")
        assert ("top_k" in hp) == (method in ("molora", "malora", "mosld"))
        assert ("expert_schedule" in hp) == (method == "mosld")
        cfg = adapter_config(kind, hp, num_layers=30)
        assert cfg.kind == method
        if method == "malora":
            # d = lam r N, r_bar = (2 - lam) r = 2 r - d / N (the budget of MoLoRA N x r)
            assert cfg.d == hp["lam"] * hp["r"] * 8 and cfg.r_bar == 2 * hp["r"] - cfg.d // 8
            assert cfg.alpha == 2.0 * cfg.r_bar
        study.tell(trial, 0.5)
    assert seen == {"lora", "molora", "malora", "mosld"}


def test_points_to_evaluate_are_enqueued_first():
    spec = load_space(SPACES / "intra_domain.yaml")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    for point in optuna_points(spec.methods, spec.search.points_to_evaluate):
        study.enqueue_trial(point)
    space, methods = ConditionalSpace(spec.methods), []
    for _ in range(4):
        trial = study.ask()
        space(trial)
        methods.append(trial.params["method"])
        study.tell(trial, 0.5)
    assert methods == ["malora", "molora", "lora", "mosld"]
    first = study.trials[0].params
    assert (first["malora.r"], first["malora.lam"], first["malora.beta"]) == (8, 0.5, 1.25)


def test_single_method_space_returns_the_method_as_constant():
    raw = smoke_raw()
    del raw["methods"]["malora"], raw["search"]["points_to_evaluate"]
    spec = spec_from_dict(raw, base_dir=SPACES)
    trial = optuna.create_study().ask()
    assert ConditionalSpace(spec.methods)(trial)["method"] == "lora"
    assert set(trial.params) == {"lora.r", "lora.lr"}


def test_mosld_expert_schedules():
    assert expert_schedule("increasing", (2, 4, 6, 8), 8) == (2, 2, 4, 4, 6, 6, 8, 8)
    assert expert_schedule("decreasing", (2, 4, 6, 8), 4) == (8, 6, 4, 2)
    cfg = adapter_config("mosld", {"expert_schedule": "increasing", "top_k": 2}, num_layers=30)
    assert len(cfg.num_experts) == 30 and cfg.num_experts[0] == 2 and cfg.num_experts[-1] == 8


def test_lr_schedule_warmup_then_cosine():
    assert schedule_factor(0, 10, 2, "cosine") == 0.5 and schedule_factor(1, 10, 2, "cosine") == 1.0
    assert schedule_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert schedule_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert schedule_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert schedule_factor(9, 10, 2, "constant") == 1.0


# ------------------------------------------------------------------------------------ CLI without Ray
def test_cli_bad_file_exits_2_listing_every_problem(tmp_path, capsys):
    raw = smoke_raw()
    raw["train"]["lr"] = "1e-5"
    raw["search"]["sampler"] = "tpee"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert search.main(["--space", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "write 1.0e-5" in err and "did you mean 'tpe'" in err


def test_cli_dry_run_prints_the_plan_and_starts_nothing(capsys):
    import ray

    assert search.main(["--space", str(SPACES / "intra_domain.yaml"), "--smoke-test", "--dry-run",
                        "--num-trials", "8"]) == 0
    out = capsys.readouterr().out
    assert "search 'intra_domain'" in out and "8 trials (2 per method, one study each), tpe" in out
    assert "max_steps=6" in out and "malora  r=choice [4, 8, 16], lam=choice [0.25, 0.5, 0.75, 1.0]" in out
    # the mission's knobs are searched: rank, d (through lam), beta, top-k
    assert "malora  rank r, lam (d = lam r N), beta, top-k, lr" in out and "molora  rank r, top-k, lr" in out
    # at r = 8, N = 8 the four lam give the paper's Fig. 4(b) grid: d = lam * 64, r_bar = (2 - lam) * 8
    assert all(f"({d}, {rb})" in out for d, rb in ((16, 14), (32, 12), (48, 10), (64, 8)))
    # SmolLM2 (hidden 576, MLP 1536, KV 192, 30 layers), six projections with n + m = 1152 (q), 768 (k, v), 2112
    # (gate, up, down): LoRA r = 30 * r * 9024, r 32..128 = 8,663,040..34,652,160
    assert "lora    8,663,040-34,652,160 trainable" in out and "not matched (search.match_budget: false)" in out
    assert "estimate     skipped (--smoke-test)" in out
    assert not ray.is_initialized()


def test_cli_rejects_bad_overrides(capsys):
    assert search.main(["--space", str(SPACES / "smoke.yaml"), "--num-trials", "0", "--dry-run"]) == 2
    assert "search.num_trials: 0 is impossible. Fix: use a value >= 1" in capsys.readouterr().err


def test_missing_file_exits_2(capsys):
    assert search.main(["--space", "nope.yaml", "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_data_dir_override(tmp_path, capsys):
    assert search.main(["--space", str(SPACES / "smoke.yaml"), "--data-dir", str(tmp_path / "nope"), "--dry-run"]) == 2
    assert "data.data_dir:" in capsys.readouterr().err
    assert search.main(["--space", str(SPACES / "smoke.yaml"), "--data-dir", str(tmp_path), "--name", "other",
                        "--storage-path", str(tmp_path / "rr"), "--dry-run", "--no-estimate"]) == 0
    out = capsys.readouterr().out
    assert f"from {tmp_path}" in out and f"storage      {tmp_path / 'rr'}/other" in out


def test_fixed_study_configs_need_every_searched_hyperparameter():
    raw = _set(_set(smoke_raw(), "study.search", False), "study.configs", {"lora": {"r": 4, "rank": 2}})
    with pytest.raises(SpaceError) as err:
        spec_from_dict(raw, base_dir=SPACES)
    assert sorted(err.value.problems) == sorted([
        "study.configs.lora.rank: unknown key. Valid keys: r, alpha_over_r, lr",
        "study.configs.lora: missing lr: with study.search false every searched hyperparameter needs a value. "
        "Fix: give them, or set study.search: true",
        "study.configs.malora: missing d, beta, lr: with study.search false every searched hyperparameter needs a "
        "value. Fix: give them, or set study.search: true"])
    ok = _set(_set(smoke_raw(), "study.search", False), "study.configs", {
        "lora": {"r": 4, "lr": 1.0e-3}, "malora": {"d": 16, "beta": 1.25, "lr": 1.0e-3}})
    assert spec_from_dict(ok, base_dir=SPACES).study.configs["malora"]["d"] == 16


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_spaces_below_1b_use_cloze(path, caplog):
    raw = yaml.safe_load(path.read_text())
    assert "options" not in (raw.get("eval") or {})
    params = model_params_hint(raw["model"]["name"])
    assert params is not None and params < 1e9, "a shipped space with a model of unknown or large size: check it"
    with caplog.at_level("WARNING", logger="orchestrator.spec.space"):
        spec = load_space(path)
    assert spec.data.formulation == "cloze" and not caplog.records


@pytest.mark.parametrize(("model", "params"), [("tiny-llama", 1e5), ("smollm2-135m-instruct", 135e6),
                                               ("HuggingFaceTB/SmolLM2-1.7B", 1.7e9), ("Qwen/Qwen2.5-0.5B", 5e8),
                                               ("/models/my_llama", None)])
def test_model_size_from_its_name(model, params):
    assert model_params_hint(model) == params


def test_a_small_model_in_the_label_formulation_is_warned_about(caplog):
    raw = _set(_set(smoke_raw(), "data.formulation", "label"), "model.name", "smollm2-135m-instruct")
    with caplog.at_level("WARNING", logger="orchestrator.spec.space"):
        spec = spec_from_dict(raw, base_dir=SPACES)
    assert spec.data.formulation == "label"
    (record,) = caplog.records
    assert "learn only the label prior" in record.message and "Robinson & Wingate" in record.message
    assert "arXiv 2406.08446" in record.message and "data.formulation: cloze" in record.message
    caplog.clear()
    with caplog.at_level("WARNING", logger="orchestrator.spec.space"):
        spec_from_dict(_set(raw, "model.name", "meta-llama/Llama-2-7b-hf"), base_dir=SPACES)
    assert not caplog.records


def test_single_task_seeds_at_most_the_replicates_and_at_least_two():
    raw = _set(_set(smoke_raw(), "study.seeds", 3), "study.single_task_seeds", 4)
    with pytest.raises(SpaceError) as err:
        spec_from_dict(raw, base_dir=SPACES)
    assert err.value.problems == [
        "study.single_task_seeds: 4 is more than study.seeds (3); the references train at the first of the "
        "replicates' seeds. Fix: at most 3, or leave it out (all of them)"]
    with pytest.raises(SpaceError, match="study.single_task_seeds"):
        spec_from_dict(_set(smoke_raw(), "study.single_task_seeds", 1), base_dir=SPACES)
    ok = _set(_set(smoke_raw(), "study.seeds", 3), "study.single_task_seeds", 2)
    assert spec_from_dict(ok, base_dir=SPACES).study.single_task_seeds == 2
