"""Search spaces: one YAML file -> one frozen, validated :class:`SearchSpec` (a pure function, no cluster).

A file has the groups ``model``, ``data``, ``train``, ``eval``, ``methods``, ``search``, ``resources``,
``tracking`` plus ``name``, ``storage_path`` and the optional ``smoke_test`` (overrides used by ``--smoke-test``)
and ``debug`` (test hooks). Every group is a frozen dataclass; the attribute docstrings below are the schema.

Validation collects *every* problem -- unknown keys (with the valid list and a "did you mean"), wrong types,
impossible values, cross-field conflicts, adapter configs that cannot be built at the corners of their
domains -- and raises one :class:`SpaceError`. PyYAML reads ``1e-5`` (no dot) as the *string* "1e-5"; such a
value is rejected with the fix ``write 1.0e-5`` rather than silently converted.

Per-method hyperparameters (``methods.<kind>.<name>``) are either a constant or one domain::

    {choice: [a, b, ...]}   {uniform: [lo, hi]}   {loguniform: [lo, hi]}   {int: [lo, hi]}   {logint: [lo, hi]}

Names are the adapter config fields of ``malora.config`` for that kind, the per-method training overrides
``lr``/``weight_decay``/``warmup_ratio``, and the derived names of :mod:`orchestrator.spec.hparams`
(``alpha_over_r``; MALoRA ``lam``; MoSLD ``expert_schedule``/``expert_levels``).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.data.pools import DEFAULT_TEST_LIMIT, DEFAULT_VAL_LIMIT
from orchestrator.spec.hparams import DOMAIN_KINDS, Domain, method_corner_configs, parse_domain, valid_hparam_names

logger = logging.getLogger(__name__)


class SpaceError(ValueError):
    """A search-space file is invalid; ``problems`` lists every problem (each names the key, value and fix)."""

    def __init__(self, problems: list[str], source: str = "search space"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


def _f(default: Any = None, **check: Any) -> Any:
    """A dataclass field whose default is copied per instance and whose ``check`` rules live in metadata."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=check)
    return field(default=default, metadata=check)


# ------------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class ModelSpec:
    name: str = _f("tiny-llama")
    """Named model of orchestrator.models.loading ("tiny-llama", "smollm2-135m-instruct"), a Hub id or a local path."""
    dtype: str = _f("auto", choices=("auto", "float32", "bfloat16", "float16"))
    """dtype the frozen base weights are held in; auto follows train.precision (bf16 -> bfloat16, else float32;
    orchestrator.models.precision). float32 with bf16/fp16 runs under autocast."""
    cache_dir: str | None = _f(None)
    """Where converted named models are cached (None: the models module's default)."""


@dataclass(frozen=True)
class DataSpec:
    suite: str | None = _f(None)
    """Suite name of orchestrator.data.tasks.SUITES (e.g. intra_domain); exclusive with ``tasks``."""
    tasks: tuple[str, ...] | None = _f(None)
    """Explicit task names; exclusive with ``suite``."""
    data_dir: str | None = _f("${MALORA_DATA_DIR:-../shared/data}")
    """Local benchmark folder; relative paths resolve against the YAML's folder, then the working directory.
    ``${VAR:-default}`` is expanded. None: let the data layer use the Hugging Face Hub."""
    train_limit: int | None = _f(None, ge=1)
    """Cap on training examples per task (None: the whole train pool)."""
    split_seed: int = _f(0, ge=0)
    """Seed of the train/val/test pools (independent of ``train.seed``: every replicate is scored on the same
    val and test items). The pools' rules are in ``orchestrator.data.pools``."""
    val_limit: int | None = _f(DEFAULT_VAL_LIMIT, ge=1)
    """Validation items per task: scored at every evaluation, the only items any choice (Optuna, ASHA, best
    trial, Pareto front) sees. None: as many as the pool rules allow."""
    test_limit: int | None = _f(DEFAULT_TEST_LIMIT, ge=1)
    """Held-out test items per task: scored once per chosen configuration (a search's best and Pareto trials after
    choosing, a study's runs at their end), reported, never chosen on.
    None: the whole official test file (or the largest carve the pool rules allow)."""
    num_train_examples: int | None = _f(None, ge=1)
    """Size of the mixed training stream (None: the sum of the capped task sets)."""
    mixing: str = _f("proportional", choices=("proportional", "uniform", "temperature"))
    """Multi-task mixing: proportional to size, uniform over tasks, or temperature sampling p_t ∝ n_t^(1/T)."""
    mixing_temperature: float = _f(2.0, gt=0)
    """T of temperature mixing."""
    template: str = _f("alpaca", choices=("alpaca", "chat"))
    """Prompt template (LLM-Adapters Alpaca style, or the tokenizer's chat template) of the label formulation and
    of free-form (math) tasks; the cloze formulation uses no template."""
    formulation: str = _f("cloze", choices=("cloze", "label"))
    """How multiple-choice items are trained AND scored (one setting, so the two cannot disagree; the zero-shot
    reference too): "cloze" = context, then the gold option's own text (lm-eval/OLMES strings, docs/cloze.md);
    "label" = the LLM-Adapters option list and "the correct answer is answerK". Models below ~1B parameters learn
    only the label prior in "label" (Robinson & Wingate, ICLR 2023; OLMES, arXiv 2406.08446)."""
    max_length: int = _f(256, ge=8)
    """Maximum tokens per training example (examples whose answer does not fit are dropped and counted)."""


@dataclass(frozen=True)
class TrainSpec:
    max_steps: int | None = _f(None, ge=1)
    """Optimizer steps per trial; exclusive with ``epochs``."""
    epochs: float | None = _f(None, gt=0)
    """Passes over the mixed training stream; exclusive with ``max_steps``."""
    batch_size: int = _f(8, ge=1)
    """Examples per micro-batch per worker."""
    grad_accum: int = _f(1, ge=1)
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum * workers)."""
    max_batch_tokens: int | None = _f(None, ge=8)
    """Cap on the padded positions (rows x longest row) of one forward: a micro-batch above it runs as row chunks
    whose losses are weighted by their share of the response tokens, so the gradient is the whole micro-batch's
    (``orchestrator.training.chunks``). Bounds activation memory on the rare long length-grouped batch; None: no cap."""
    lr: float = _f(4.0e-4, gt=0, lt=1)
    """Peak AdamW learning rate (MALoRA intra-domain: 4e-4); a method's ``lr`` hyperparameter overrides it."""
    schedule: str = _f("cosine", choices=("cosine", "linear", "constant"))
    """Decay after linear warm-up: lr_t = lr * w(t) with w the warm-up ramp, then cosine/linear to 0."""
    warmup_ratio: float = _f(0.1, ge=0, lt=1)
    """Fraction of the steps spent warming up linearly from 0."""
    weight_decay: float = _f(0.01, ge=0)
    """AdamW decoupled weight decay."""
    max_grad_norm: float | None = _f(1.0, gt=0)
    """Gradient clipping by global norm (None: no clipping)."""
    precision: str = _f("auto", choices=("auto", "bf16", "fp32", "fp16"))
    """Precision of training: auto = bf16 where the device computes it natively (a bf16 GPU, a CPU with AMX-BF16 or
    AVX512-BF16), else fp32; resolved once per run and recorded (``precision``, ``precision_reason``). fp16 needs
    a GPU. Adapter weights and optimizer state stay fp32."""
    seed: int = _f(0, ge=0)
    """Seed of data sampling, adapter init and dropout."""
    compile: bool = _f(False)
    """Compile each decoder block with torch.compile (Inductor) for training (``malora.compile.compile_blocks``):
    the memory-bound work between the GEMMs (norms, SiLU x up, casts, adapter dropout and routing) fused per block.
    Costs a one-off compilation per trial (Inductor's cache shares it between trials); scoring stays eager. Not
    with gradient checkpointing. Measured: benchmarks/README.md ("Compiled decoder blocks")."""
    group_by_length: bool = _f(True)
    """Length-grouped micro-batches: shuffle, cut into mega-batches of 50 batches, sort each by length, batch,
    shuffle the batches (``orchestrator.data.batching``); padding falls from ~31 % to ~1 % of the positions.
    False: batches of a plain shuffle (the order of earlier versions)."""


@dataclass(frozen=True)
class EvalSpec:
    every_n_steps: int = _f(50, ge=1)
    """Evaluate (and report to Tune/MLflow, checkpoint the adapter) every N optimizer steps and at the end."""
    scoring: str = _f("loglik", choices=("loglik", "generate"))
    """Option log-likelihood (robust default for small models) or LLM-Adapters' greedy generation."""
    batch_size: int = _f(8, ge=1)
    """Evaluation batch size."""
    precision: str = _f("auto", choices=("auto", "bf16", "fp32", "fp16"))
    """Precision of scoring (as train.precision; the log-softmax is always float32). Must be computable on the
    base weights training holds (bfloat16 weights cannot score fp32): auto follows train.precision where the
    device's own choice could not run on them (bf16 training without bf16 units), and the reason is recorded."""
    grad_conflict: bool = _f(True)
    """At each evaluation, the task x task cosine of the tasks' LM-loss gradients on fixed train probe items
    (``orchestrator.evaluation.grad_conflict``; 0.8 % of the CPU study's training time, 2.6 % evaluating every 50
    steps: benchmarks/README.md). false: off."""
    probe_items: int = _f(8, ge=1)
    """Train items per task in the gradient-conflict probe (drawn once with data.split_seed, recorded)."""


@dataclass(frozen=True)
class AshaSpec:
    enabled: bool = _f(True)
    """Stop weak trials early (ASHA) on the first objective, once per evaluation (time unit = evaluations)."""
    grace_period: int = _f(1, ge=1)
    """Evaluations every trial gets before it can be stopped."""
    reduction_factor: int = _f(2, ge=2)
    """Keep the top 1/reduction_factor at each rung."""
    max_t: int | None = _f(None, ge=1)
    """Maximum evaluations per trial (None: derived from train.max_steps / eval.every_n_steps)."""


@dataclass(frozen=True)
class SearchOptions:
    sampler: str = _f("tpe", choices=("tpe", "nsga2", "random"))
    """Optuna sampler: TPE (seeded, multivariate over the conditional space, single- or multi-objective, constant
    liar when trials run concurrently), NSGA-II (multi-objective, fixed spaces only: one method), or random."""
    num_trials: int = _f(16, ge=1)
    """Number of trials, a multiple of the number of methods: each method gets ``num_trials / methods`` trials
    from its own Optuna study (``orchestrator.tuning.searcher``), so no method gets more tuning than another."""
    seed: int = _f(0, ge=0)
    """Sampler seed."""
    objectives: dict | None = _f(None)
    """Ordered ``{metric: max|min}``; more than one entry makes the search multi-objective (Pareto front).
    Default: ``{val/mean_acc: max}``; for nsga2 ``{val/mean_acc: max, trainable_params: min}``. Only metrics that
    every trial reports at every evaluation are accepted (``OBJECTIVE_METRICS``, ``val/acc/<task>``); ``test/*``
    never feeds a choice."""
    n_startup_trials: int = _f(4, ge=0)
    """Random trials before TPE models the space."""
    asha: AshaSpec = _f(None)
    """ASHA early stopping."""
    points_to_evaluate: tuple | None = _f(None)
    """Trials to run first, e.g. ``[{method: malora, d: 32, beta: 1.25}]`` (unnamed hyperparameters sampled)."""
    match_budget: bool = _f(True)
    """Methods are compared at one trainable-parameter budget: every configuration a method can take must have
    a count within ``budget_tolerance`` of the budget (checked on the model before anything runs), and no
    method's rank ``r`` may be searched. False: counts may differ on purpose (e.g. a rank sweep); they are still
    reported."""
    budget_method: str | None = _f(None)
    """The method whose trainable count (at its lowest corner) is the budget; None: molora if present, else the
    first method."""
    budget_tolerance: float = _f(0.10, gt=0, lt=1)
    """Largest relative difference |count / budget - 1| allowed when ``match_budget`` is true."""


@dataclass(frozen=True)
class ResourcesSpec:
    workers_per_trial: int = _f(1, ge=1)
    """Ray Train workers (DDP ranks) per trial."""
    cpus_per_worker: float = _f(1.0, gt=0)
    """CPUs per worker slot. Each Train worker asks Ray for ``cpus_per_worker - trial_driver_cpus`` so that a
    trial (driver + workers) fits in ``workers_per_trial * cpus_per_worker`` CPUs; torch uses
    round(cpus_per_worker) threads."""
    gpus_per_worker: float = _f(0.0, ge=0)
    """GPUs per worker (>0 turns on use_gpu)."""
    trial_driver_cpus: float = _f(0.01, gt=0, lt=1)
    """CPU reserved by the Tune function that drives a trial's TorchTrainer (a full CPU would deadlock 2-core boxes)."""
    max_concurrent_trials: int | str = _f("auto")
    """Concurrent trials, or "auto": as many as the cluster's free CPUs/GPUs fit."""
    max_failures: int = _f(0, ge=-1)
    """Ray Train worker-group restarts per trial (from the last adapter checkpoint); -1 = unlimited."""
    checkpoint_every_min: float = _f(10.0, ge=0)
    """Minutes between saves of the training state between evaluations (``training.partial``): a worker killed
    there resumes from it, with its RNG, instead of from the last evaluation. 0: only at evaluations. Not part
    of a run's fingerprint: the continuation trains exactly what an uninterrupted run trains."""


@dataclass(frozen=True)
class TrackingSpec:
    tracking_uri: str | None = _f(None)
    """MLflow URI (None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db with artifacts in ./mlartifacts)."""
    experiment: str = _f("malora-search")
    """MLflow experiment name."""


@dataclass(frozen=True)
class DebugSpec:
    fail_method: str | None = _f(None)
    """Test hook: trials of this method fail on purpose."""
    fail_mode: str = _f("raise", choices=("raise", "nan", "kill"))
    """raise an exception, turn the loss into NaN (exercises the NaN guard), or SIGKILL the worker's own process
    before the step, in a worker that started at step 0 only (exercises the states saved between evaluations:
    the restarted worker resumes past step 0 and goes on)."""
    fail_at_step: int = _f(1, ge=1)
    """Optimizer step at which the failure happens."""


@dataclass(frozen=True)
class StudySpec:
    """``python -m orchestrator.study``: choose on val, retrain over seeds, compare on test (``tuning.study``)."""

    seeds: int = _f(3, ge=1)
    """Training seeds per chosen configuration: the first ones from train.seed up that no search trial trained with
    (so train.seed + 1, ... after a search; recorded in the study's plan.json); the pools stay fixed."""
    search: bool = _f(True)
    """Run the search first and take each method's best completed trial on val; false: use ``configs``."""
    configs: dict | None = _f(None)
    """``{method: {hyperparameter: value}}``: the configurations to replicate when ``search`` is false (e.g. the
    papers' settings); a method's constants need not be repeated. With ``search`` true, ignored."""
    single_task: bool = _f(True)
    """Train one LoRA per task on that task alone, same per-task examples and seeds (the papers' "(ST)" rows)."""
    single_task_seeds: int | None = _f(None, ge=2)
    """How many of the replicates' seeds (the first ones) the single-task references train at; None: all of them.
    Fewer saves their runs where the study's question is between methods; each Δ vs single-task then pairs the
    method's runs at those seeds only (fewer seeds: a wider interval, said in the report). At least 2, so the
    seed variance of the Δ is measured."""
    single_task_method: str = _f("lora")
    """Method of the single-task references; its configuration is the one chosen (or given) for that method."""
    zero_shot: bool = _f(True)
    """Score the base model on the test pools (reported beside every table)."""
    n_boot: int = _f(10_000, ge=100)
    """Draws of the item-level paired bootstrap shown beside each comparison's t-test over seeds."""
    comparisons: tuple[str, ...] | None = _f(None)
    """Paired comparisons as "a-b" (default: malora-molora, malora-lora, molora-lora among the methods present)."""
    noise_multiple: float = _f(2.0, gt=0)
    """A task counts as regressed only when its Δ vs the single-task reference is significantly negative in the
    one-sided primary test at Φ(-noise_multiple) (2.3 % for 2), so noise alone gives T·Φ(-k) such tasks."""
    equivalence_margin: float = _f(0.008, gt=0, lt=1)
    """Margin δ (accuracy, 0.008 = 0.8 points: the MALoRA paper's intra-domain MALoRA − MoLoRA gap) of the TOST
    that alone may call two methods equivalent: both one-sided tests of |Δ| >= δ reject at 5 %."""
    time_bound_min: float = _f(150.0, gt=0)
    """The wall time the study must fit on the machine that runs it: ``--dry-run`` compares its estimate with it
    (150: issue 23's bound for the CPU study; the powered study's is 240)."""
    choice_seeds: tuple[int, ...] = _f(())
    """Training seeds of the probes and pilots whose results fixed a choice of this study (a learning-rate probe,
    a pilot that sized it): recorded in the plan, and never used by a replicate or single-task run."""
    secondary_without: tuple[str, ...] = _f(())
    """Tasks left out of a named secondary: the mean over the other tasks, reported beside the primary with the
    same statistics (its own Holm family), and each left-out task's share of the mean's gain over zero-shot. E.g.
    [boolq]: the LLM-Adapters BoolQ file has no passage, so its gain is the yes/no prior. Changes the report only:
    ``--resume`` and ``--report-only`` accept a changed value."""


@dataclass(frozen=True)
class MethodSpec:
    kind: str
    """Adapter kind (lora, molora, malora, mosld, hydra)."""
    hparams: tuple[tuple[str, Domain], ...]
    """(name, domain) pairs in file order; constants are Domain("const", (value,))."""


@dataclass(frozen=True)
class SearchSpec:
    name: str
    """Search name: the Tune experiment folder under storage_path and the MLflow parent run name."""
    storage_path: str
    """Absolute folder holding the Tune experiment (trial results, adapter checkpoints, reference accuracy)."""
    model: ModelSpec
    data: DataSpec
    train: TrainSpec
    eval: EvalSpec
    methods: tuple[MethodSpec, ...]
    search: SearchOptions
    resources: ResourcesSpec
    tracking: TrackingSpec
    debug: DebugSpec
    smoke_test: dict
    """Overrides applied by --smoke-test (already validated)."""
    study: StudySpec = field(default_factory=StudySpec)
    source: str = ""
    """The YAML file it came from."""

    @property
    def objectives(self) -> dict[str, str]:
        return dict(self.search.objectives)

    @property
    def metric(self) -> str:
        """Primary objective (ASHA and 'best trial' use it)."""
        return next(iter(self.search.objectives))

    def method(self, kind: str) -> MethodSpec:
        return next(m for m in self.methods if m.kind == kind)


GROUPS = {"model": ModelSpec, "data": DataSpec, "train": TrainSpec, "eval": EvalSpec, "search": SearchOptions,
          "resources": ResourcesSpec, "tracking": TrackingSpec, "debug": DebugSpec, "study": StudySpec}
TOP_KEYS = ("name", "storage_path", *GROUPS, "methods", "smoke_test")
SMOKE_DEFAULTS = {"train": {"max_steps": 8, "epochs": None}, "eval": {"every_n_steps": 4},
                  "data": {"train_limit": 64, "val_limit": 16, "test_limit": 16, "max_length": 128}, "search": {"num_trials": 4}}
"""--smoke-test without a ``smoke_test`` block: cap steps, eval items, train items and trials (values are minima
with the file's own, except num_trials which becomes max(4, number of methods) capped by the file's, then
rounded down to a multiple of the number of methods)."""


#: Keys of earlier versions, with what replaced them (one clear error instead of "unknown key").
RENAMED = {"eval.eval_limit": "use data.val_limit (items scored during training, the only ones choices see) and "
                              "data.test_limit (held-out items, scored once on the final adapter and reported)",
           "eval.options": "use data.formulation: cloze (was options: text) or label (was options: label); one "
                           "setting now drives both the training targets and the scoring"}


# --------------------------------------------------------------------------------------------- type checks
def _unknown(keys: list[str], valid: list[str], where: str) -> list[str]:
    out = []
    for key in keys:
        close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        out.append(f"{where}{key}: unknown key{hint}. Valid keys: {', '.join(valid)}")
    return out


def numeric_string_fix(value: Any) -> str | None:
    """'1e-5' -> '1.0e-5' (what to write instead) when ``value`` is a string PyYAML did not read as a number."""
    if not isinstance(value, str) or not re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", value):
        return None
    text = value.strip()
    mantissa, _, exponent = text.lower().partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}e{exponent}" if exponent else mantissa


def _check_type(value: Any, tp: Any, path: str) -> str | None:
    """None if ``value`` matches the annotation ``tp``, else the problem text."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = [_check_type(value, a, path) for a in args if a is not type(None)]
        return None if any(e is None for e in errors) else errors[0]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return None
    if tp in (int, str, bool, dict) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return None
    if origin is tuple or tp is tuple:
        if isinstance(value, (list, tuple)) and (not args or all(isinstance(v, args[0]) for v in value)):
            return None
        return f"{path}: {value!r} must be a list" + (f" of {args[0].__name__}" if args else "")
    fix = numeric_string_fix(value) if tp in (int, float) else None
    if fix is not None:
        return (f"{path}: {value!r} is a string, not a number (PyYAML reads exponents without a dot as text). "
                f"Fix: write {fix}")
    name = getattr(tp, "__name__", str(tp))
    return f"{path}: {value!r} must be of type {name}, got {type(value).__name__}"


def _check_rules(value: Any, rules: dict, path: str) -> str | None:
    if value is None:
        return None
    if "choices" in rules and value not in rules["choices"]:
        close = difflib.get_close_matches(str(value), [str(c) for c in rules["choices"]], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{path}: {value!r} is not allowed{hint}. Fix: use one of {', '.join(map(str, rules['choices']))}"
    for op, test, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                           ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
        if op in rules and isinstance(value, (int, float)) and not test(value, rules[op]):
            return f"{path}: {value!r} is impossible. Fix: use a value {word} {rules[op]}"
    return None


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Instantiate a group dataclass from a mapping, appending every problem; falls back to defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{path}: must be a mapping of keys to values, got {type(raw).__name__}")
        raw = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - set(fields))
    for key in [k for k in unknown if f"{path}.{k}" in RENAMED]:
        problems.append(f"{path}.{key} was replaced: {RENAMED[f'{path}.{key}']}")
        unknown.remove(key)
    problems += _unknown(unknown, list(fields), f"{path}.")
    kwargs = {}
    for name, fld in fields.items():
        if name not in raw:
            continue
        value, where = raw[name], f"{path}.{name}"
        if cls is SearchOptions and name == "asha":
            kwargs[name] = _build(AshaSpec, value, where, problems)
            continue
        problem = _check_type(value, hints[name], where) or _check_rules(value, fld.metadata, where)
        if problem:
            problems.append(problem)
        else:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    obj = cls(**kwargs)
    if cls is SearchOptions and obj.asha is None:
        obj = dataclasses.replace(obj, asha=AshaSpec())
    return obj


# ---------------------------------------------------------------------------------------------- paths
_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")


def expand_env(text: str) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``$VAR`` (unset without default -> empty)."""
    def sub(m: re.Match) -> str:
        var = m.group(1) or m.group(3)
        return os.environ.get(var) or (m.group(2) or "")
    return _ENV.sub(sub, text)


def _precision_conflicts(model_dtype: str, train: str, evaluation: str) -> list[str]:
    """Precision settings that disagree whatever the device (``auto`` ones are checked when resolved)."""
    from orchestrator.models.precision import conflict, held_dtype

    held = held_dtype(model_dtype, train) if train != "auto" else model_dtype
    found = [conflict(p, held, key) for key, p in (("train.precision", train), ("eval.precision", evaluation))
             if p != "auto" and held != "auto"]
    return [p for p in found if p]


def resolve_data_dir(raw: str | None, base_dir: Path) -> tuple[str | None, str | None]:
    """(absolute data dir or None, problem or None); relative paths: the YAML's folder first, then the cwd."""
    if raw is None:
        return None, None
    text = expand_env(raw)
    path = Path(text).expanduser()
    candidates = [path] if path.is_absolute() else [base_dir / path, Path.cwd() / path]
    for cand in candidates:
        if cand.is_dir():
            return str(cand.resolve()), None
    tried = " or ".join(str(c) for c in candidates)
    return None, (f"data.data_dir: {raw!r} -> no such folder ({tried}). Fix: set data.data_dir to the benchmark "
                  "folder (see ../shared/data/README.md), export MALORA_DATA_DIR, or set it to null for the Hub")


# ----------------------------------------------------------------------------------------------- entry
def spec_from_dict(raw: Any, *, base_dir: str | Path = ".", source: str = "search space",
                   smoke_test: bool = False, overrides: dict | None = None) -> SearchSpec:
    """Validate a parsed YAML mapping into a SearchSpec, raising one SpaceError listing every problem.

    ``overrides`` (e.g. from the command line: ``{"search": {"num_trials": 3}, "name": "x"}``) are merged last
    and validated like the file's own values.
    """
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise SpaceError([f"top level: must be a mapping, got {type(raw).__name__}"], source)
    problems += _unknown(sorted(set(map(str, raw)) - set(TOP_KEYS)), list(TOP_KEYS), "")
    smoke = raw.get("smoke_test") or {}
    if not isinstance(smoke, dict):
        problems.append("smoke_test: must be a mapping of group -> overrides")
        smoke = {}
    if smoke_test:
        raw = apply_smoke_overrides(raw, smoke)
    for key, value in (overrides or {}).items():
        base = raw.get(key) if isinstance(raw.get(key), dict) else {}
        raw = {**raw, key: {**base, **value} if isinstance(value, dict) else value}
    groups = {key: _build(cls, raw.get(key), key, problems) for key, cls in GROUPS.items()}
    for key in set(smoke) - set(GROUPS):
        problems += _unknown([key], list(GROUPS), "smoke_test.")
    for key, cls in GROUPS.items():  # the overrides themselves must be valid even when not applied
        if isinstance(smoke.get(key), dict):
            _build(cls, smoke[key], f"smoke_test.{key}", problems)

    name = raw.get("name", Path(source).stem if source != "search space" else "search")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
        problems.append(f"name: {name!r} must be a folder-safe name (letters, digits, - _ .). Fix: e.g. intra_domain")
    storage = raw.get("storage_path", "ray_results")
    if not isinstance(storage, str) or not storage:
        problems.append(f"storage_path: {storage!r} must be a path string. Fix: e.g. ray_results")
        storage = "ray_results"
    storage = expand_env(storage)
    if "://" not in storage:
        storage = str((Path.cwd() / Path(storage).expanduser()).resolve())

    data, train, search = groups["data"], groups["train"], groups["search"]
    data_dir, problem = resolve_data_dir(data.data_dir, Path(base_dir))
    problems += [problem] if problem else []
    data = dataclasses.replace(data, data_dir=data_dir)
    if (data.suite is None) == (data.tasks is None):
        problems.append("data: give exactly one of data.suite (e.g. intra_domain) or data.tasks (a list)")
    if data.tasks is not None and not data.tasks:
        problems.append("data.tasks: is empty. Fix: list at least one task or use data.suite")
    problems += _check_tasks(data)
    if data.formulation == "cloze" and groups["eval"].scoring == "generate":
        problems.append("eval.scoring: 'generate' decodes from the templated prompt, i.e. the label formulation, "
                        "but data.formulation is 'cloze'. Fix: eval.scoring: loglik, or data.formulation: label")
    if (train.max_steps is None) == (train.epochs is None):
        problems.append("train: give exactly one of train.max_steps or train.epochs")
    if train.precision == "fp16" and groups["resources"].gpus_per_worker == 0:
        problems.append("train.precision: 'fp16' needs a GPU. Fix: use bf16 or fp32, or set resources.gpus_per_worker")
    problems += _precision_conflicts(groups["model"].dtype, train.precision, groups["eval"].precision)
    res = groups["resources"]
    mct = res.max_concurrent_trials
    if not (mct == "auto" or (isinstance(mct, int) and not isinstance(mct, bool) and mct >= 1)):
        problems.append(f"resources.max_concurrent_trials: {mct!r} must be a positive integer or 'auto'")
    if res.workers_per_trial > 1 and res.gpus_per_worker != int(res.gpus_per_worker):
        problems.append(f"resources.gpus_per_worker: {res.gpus_per_worker} with workers_per_trial="
                        f"{res.workers_per_trial}: Ray may place two DDP ranks of one trial on the same GPU, which "
                        "NCCL refuses. Fix: whole GPUs per worker (e.g. 1), or workers_per_trial: 1 to share GPUs "
                        "between trials")
    if res.gpus_per_worker == 0 and res.cpus_per_worker <= res.trial_driver_cpus:
        problems.append("resources.cpus_per_worker: must exceed resources.trial_driver_cpus "
                        f"({res.trial_driver_cpus}), which each worker leaves to the trial's driver")

    methods = _build_methods(raw.get("methods"), problems)
    kinds = [m.kind for m in methods]
    declared = ({k: set(v) if isinstance(v, dict) else set() for k, v in raw["methods"].items()}
                if isinstance(raw.get("methods"), dict) else {})
    search = _check_search(search, declared, problems)
    if search.match_budget:
        problems += [f"methods.{m.kind}.r: {dom.describe()} is searched while search.match_budget is true; the "
                     f"rank sets the method's trainable-parameter budget. Fix: fix it (e.g. r: 64 for LoRA, the "
                     "rank closest to MoLoRA 8 x r8), or set search.match_budget: false to compare unequal budgets "
                     "on purpose" for m in methods for name, dom in m.hparams if name == "r" and dom.kind != "const"]
    problems += _check_points(search.points_to_evaluate, methods)
    problems += _check_objectives(search.objectives, data)
    if "study" in raw and methods:  # a search-only space is not held to the study defaults (e.g. a lora reference)
        problems += _check_study(groups["study"], methods, space_tasks(data))
    dbg = groups["debug"]
    if dbg.fail_method is not None and dbg.fail_method not in kinds:
        problems.append(f"debug.fail_method: {dbg.fail_method!r} is not a searched method ({', '.join(kinds)})")
    if problems:
        raise SpaceError(problems, source)
    warn_small_label(groups["model"].name, data.formulation, source)
    return SearchSpec(name=name, storage_path=storage, model=groups["model"], data=data, train=train,
                      eval=groups["eval"], methods=tuple(methods), search=search, resources=res,
                      tracking=groups["tracking"], debug=dbg, smoke_test=smoke, source=source,
                      study=groups["study"])


def model_params_hint(name: str) -> float | None:
    """Parameters of a model from its name (``tiny-llama``; ``...-135m-...``, ``...-1.7B``), None when unknown."""
    if name == "tiny-llama":
        return 1e5
    sizes = re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)([mMbB])(?![a-zA-Z])", Path(name).name.replace("_", "-"))
    if not sizes:
        return None
    value, unit = sizes[-1]
    return float(value) * (1e6 if unit.lower() == "m" else 1e9)


def warn_small_label(model: str, formulation: str, source: str) -> None:
    """A model below ~1B parameters in the label formulation learns only the label prior: say so (logged)."""
    params = model_params_hint(model)
    if formulation == "label" and params is not None and params < 1e9:
        logger.warning("%s: model %s (~%.3gM parameters) with data.formulation: label. Models below ~1B parameters "
                       "cannot bind option symbols to option texts and learn only the label prior in the label "
                       "formulation (Robinson & Wingate, ICLR 2023; OLMES, arXiv 2406.08446; issue 20: SmolLM2-135M "
                       "reached exactly one label's share per task). Use data.formulation: cloze",
                       source, model, params / 1e6)


def _check_study(study: StudySpec, methods: list[MethodSpec], tasks: tuple[str, ...]) -> list[str]:
    """Fixed configurations name declared methods and every searched hyperparameter; comparisons are "a-b"; the
    secondary leaves out tasks of the space, not all of them."""
    kinds = {m.kind: m for m in methods}
    out = []
    if study.single_task and study.single_task_method not in kinds:
        out.append(f"study.single_task_method: {study.single_task_method!r} is not a method of this space "
                   f"({', '.join(kinds)}). Fix: add it under methods, or set study.single_task: false")
    if study.single_task_seeds is not None and study.single_task_seeds > study.seeds:
        out.append(f"study.single_task_seeds: {study.single_task_seeds} is more than study.seeds "
                   f"({study.seeds}); the references train at the first of the replicates' seeds. Fix: at most "
                   f"{study.seeds}, or leave it out (all of them)")
    if study.secondary_without:
        left = set(tasks) - set(study.secondary_without)
        unknown = [t for t in study.secondary_without if t not in tasks]
        if unknown:
            out.append(f"study.secondary_without: {', '.join(map(repr, unknown))} is not a task of this space "
                       f"({', '.join(tasks)}). Fix: name tasks of data.tasks / data.suite")
        elif not left:
            out.append("study.secondary_without: leaves no task for the secondary mean. Fix: leave at least one out "
                       "of the list")
    for i, pair in enumerate(study.comparisons or ()):
        a, sep, b = str(pair).partition("-")
        if not sep or a not in kinds or b not in kinds:
            out.append(f"study.comparisons[{i}]: {pair!r} must be 'a-b' with a and b among {', '.join(kinds)}")
    configs = study.configs or {}
    for kind, values in configs.items():
        if kind not in kinds:
            out.append(f"study.configs.{kind}: not a method of this space ({', '.join(kinds)})")
        elif not isinstance(values, dict):
            out.append(f"study.configs.{kind}: must be a mapping of hyperparameter -> value")
    if not study.search:
        for kind, method in kinds.items():
            given = configs.get(kind) if isinstance(configs.get(kind), dict) else {}
            names = [n for n, _ in method.hparams]
            out += _unknown(sorted(set(given) - set(names)), names, f"study.configs.{kind}.")
            missing = [n for n, dom in method.hparams if dom.kind != "const" and n not in given]
            if missing:
                out.append(f"study.configs.{kind}: missing {', '.join(missing)}: with study.search false every "
                           "searched hyperparameter needs a value. Fix: give them, or set study.search: true")
    return out


#: Metrics every trial reports at every evaluation, so any of them can steer a choice (plus val/acc/<task>).
OBJECTIVE_METRICS = ("val/mean_acc", "trainable_params", "trainable_share", "total_params", "tokens_per_s",
                     "step_time_s", "peak_memory_mb", "train_loss")


def space_tasks(data: DataSpec) -> tuple[str, ...]:
    """The tasks of ``data``: its suite's (``orchestrator.data.tasks.SUITES``) or its ``tasks``."""
    from orchestrator.data.tasks import SUITES

    return tuple(SUITES.get(data.suite or "", ())) if data.suite else tuple(data.tasks or ())


def _check_objectives(objectives: dict | None, data: DataSpec) -> list[str]:
    """Each objective must be reported by every trial at every evaluation, and never be a test metric."""
    tasks = space_tasks(data)
    valid = [*OBJECTIVE_METRICS, *(f"val/acc/{t}" for t in tasks)]
    out = []
    for name in objectives or {}:
        if name in valid:
            continue
        if str(name).startswith(("test/", "test_correct/")):
            out.append(f"search.objectives.{name}: test metrics are held out and never feed a choice. Fix: use the "
                       f"validation metric {str(name).replace('test/', 'val/', 1)!r}")
        elif name == "mean_acc" or str(name).startswith("acc/"):
            out.append(f"search.objectives.{name}: renamed to 'val/{name}' (choices are made on the val pool)")
        else:
            out += [p.replace("unknown key", "not reported by trials").replace("Valid keys", "Reported")
                    for p in _unknown([name], valid, "search.objectives.")]
    return out


def _check_tasks(data: DataSpec) -> list[str]:
    """Suite and task names against orchestrator.data.tasks."""
    from orchestrator.data.tasks import SUITES, get_task

    out = []
    if data.suite is not None and data.suite not in SUITES:
        out += [p.replace("unknown key", "unknown suite").replace("Valid keys", "Valid suites")
                for p in _unknown([data.suite], sorted(SUITES), "data.suite: ")]
    for name in data.tasks or ():
        try:
            get_task(name)
        except ValueError as exc:
            out.append(f"data.tasks: {exc}")
    return out


def _build_methods(raw: Any, problems: list[str]) -> list[MethodSpec]:
    from malora.config import CONFIG_CLASSES

    if not isinstance(raw, dict) or not raw:
        problems.append("methods: must map at least one adapter kind to its hyperparameters, e.g. "
                        "{lora: {r: {choice: [8, 16]}}}")
        return []
    methods = []
    for kind, params in raw.items():
        if kind not in CONFIG_CLASSES:
            problems += _unknown([kind], sorted(CONFIG_CLASSES), "methods.")
            continue
        params = params or {}
        if not isinstance(params, dict):
            problems.append(f"methods.{kind}: must be a mapping of hyperparameter -> value or domain")
            continue
        valid = valid_hparam_names(kind)
        problems += _unknown(sorted(set(params) - set(valid)), valid, f"methods.{kind}.")
        hps = []
        for name, value in params.items():
            if name not in valid:
                continue
            dom, problem = parse_domain(value, f"methods.{kind}.{name}", numeric_string_fix)
            if problem:
                problems.append(problem)
            else:
                hps.append((name, dom))
        spec = MethodSpec(kind=kind, hparams=tuple(hps))
        if len(hps) == sum(1 for n in params if n in valid):
            problems += method_corner_configs(spec)
        methods.append(spec)
    return methods


def _check_search(search: SearchOptions, declared: dict[str, set], problems: list[str]) -> SearchOptions:
    objectives = search.objectives
    if objectives is None:
        objectives = {"val/mean_acc": "max"}
        if search.sampler == "nsga2":
            objectives["trainable_params"] = "min"
    bad = {k: v for k, v in objectives.items() if v not in ("max", "min")}
    if bad or not objectives:
        problems.append(f"search.objectives: {dict(objectives)!r} must map metric names to max|min, e.g. "
                        "{val/mean_acc: max, trainable_params: min}")
    if search.sampler == "nsga2" and len(objectives) < 2:
        problems.append("search.sampler: nsga2 is multi-objective. Fix: give two search.objectives or use tpe")
    if search.sampler == "nsga2" and len(declared) > 1:
        problems.append(f"search.sampler: nsga2 evolves only the parameters every trial has (Optuna's intersection "
                        f"search space); with several methods ({', '.join(declared)}) that is 'method' alone and "
                        "every other hyperparameter would be drawn at random. Fix: use tpe (multi-objective TPE "
                        "models the conditional space), or search one method")
    from malora.config import CONFIG_CLASSES

    kinds = [k for k in declared if k in CONFIG_CLASSES]
    if kinds and search.num_trials % len(kinds):
        n, k = len(kinds), search.num_trials
        fixes = " or ".join(str(v) for v in (k - k % n, k - k % n + n) if v)
        problems.append(f"search.num_trials: {k} is not a multiple of the {n} methods ({', '.join(kinds)}); each "
                        f"method gets the same number of trials. Fix: num_trials: {fixes}")
    if search.budget_method is not None and declared and search.budget_method not in declared:
        problems.append(f"search.budget_method: {search.budget_method!r} is not a method of this space "
                        f"({', '.join(declared)})")
    points = []
    for i, point in enumerate(search.points_to_evaluate or ()):
        where = f"search.points_to_evaluate[{i}]"
        if not isinstance(point, dict) or point.get("method") not in declared:
            if declared:  # (no methods at all is reported once, under methods)
                problems.append(f"{where}: {point!r} needs 'method' set to one of {', '.join(declared)}")
            continue
        valid = sorted(declared.get(point["method"], ()))
        problems += _unknown(sorted(set(point) - {"method"} - set(valid)), valid, f"{where}.")
        points.append(dict(point))
    return dataclasses.replace(search, objectives=dict(objectives), points_to_evaluate=tuple(points) or None)


def _check_points(points: tuple | None, methods: list[MethodSpec]) -> list[str]:
    """Each value of a first trial lies in its hyperparameter's domain; constants are not searched, so a value
    for one would be silently dropped."""
    kinds = {m.kind: dict(m.hparams) for m in methods}
    out = []
    for i, point in enumerate(points or ()):
        doms = kinds.get(point["method"], {})
        for name, value in point.items():
            dom, where = doms.get(name), f"search.points_to_evaluate[{i}].{name}"
            if name == "method" or dom is None:
                continue
            if dom.kind == "const":
                out.append(f"{where}: {value!r} is for a constant (methods.{point['method']}.{name} is fixed at "
                           f"{dom.low!r}), which no trial searches. Fix: drop it from the point, or give "
                           f"methods.{point['method']}.{name} a domain")
                continue
            problem = _outside(value, dom)
            if problem:
                out.append(f"{where}: {value!r} {problem}. Fix: a value inside methods.{point['method']}.{name}")
    return out


def _outside(value: Any, dom: Domain) -> str | None:
    """Why ``value`` is not in ``dom`` (None when it is)."""
    if dom.kind == "choice":
        v = tuple(value) if isinstance(value, list) else value
        return None if v in dom.values else f"is not one of the choices {list(dom.values)!r}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if dom.kind in ("int", "logint") and not (number and float(value).is_integer()):
        return f"must be an integer in [{dom.low}, {dom.high}]"
    if not number:
        fix = numeric_string_fix(value)
        return f"must be a number (write {fix})" if fix else f"must be a number in [{dom.low}, {dom.high}]"
    return None if dom.low <= value <= dom.high else f"is outside {dom.kind} [{dom.low}, {dom.high}]"


def apply_smoke_overrides(raw: dict, smoke: dict) -> dict:
    """The raw mapping with --smoke-test overrides merged in: the file's ``smoke_test`` block verbatim, or
    else SMOKE_DEFAULTS as caps (min with the file's value; num_trials = min(file, max(4, #methods)))."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for group, values in (smoke or SMOKE_DEFAULTS).items():
        if not isinstance(values, dict) or group not in GROUPS:
            continue
        merged = dict(out.get(group) or {})
        for key, value in values.items():
            old = merged.get(key)
            n_methods = max(1, len(raw.get("methods") or {}) if isinstance(raw.get("methods"), dict) else 1)
            if not smoke and key == "num_trials":
                value = max(value, n_methods)
            if not smoke and value is not None and isinstance(old, int) and not isinstance(old, bool):
                value = min(old, value)
            if not smoke and key == "num_trials" and isinstance(value, int) and value >= n_methods:
                value -= value % n_methods  # the same number of trials per method
            merged[key] = value
        out[group] = merged
    return out


def load_space(path: str | Path, *, smoke_test: bool = False, overrides: dict | None = None) -> SearchSpec:
    """Read and validate a search-space YAML file (see the module docstring for the schema)."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError([f"--space: {str(path)!r} does not exist. Fix: pass a YAML file such as "
                          "search_spaces/smoke.yaml"], str(path))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError([f"YAML syntax: {exc}"], str(path)) from None
    return spec_from_dict(raw, base_dir=path.resolve().parent, source=str(path), smoke_test=smoke_test,
                          overrides=overrides)


__all__ = ["SearchSpec", "SpaceError", "load_space", "spec_from_dict", "DOMAIN_KINDS", "Domain",
           "numeric_string_fix", "expand_env"]
