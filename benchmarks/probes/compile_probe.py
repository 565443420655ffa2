"""Probe: our bf16 training loop with parts of the model under ``torch.compile``, interleaved with eager.

    python benchmarks/probes/compile_probe.py --mode regional --rounds 6   # RMSNorm and SiLU x up compiled
    python benchmarks/probes/compile_probe.py --mode layers --rounds 4     # every decoder layer, adapters inside
    python benchmarks/probes/compile_probe.py --mode layers-mask-dropout   # the same, dropout as F.dropout
    python benchmarks/probes/compile_probe.py --mode layers-no-dropout     # the same, no adapter dropout

Two copies of one variant of ``benchmarks/_harness.py``'s loop (LoRA r16 unless ``--adapter``) on the base held in
bf16 train on the same batches of the study (``search_spaces/intra_domain_cpu.yaml``, 32 rows, the longest row at
most 90 tokens), one eager and one with ``--mode`` compiled (Inductor, ``dynamic=True``), in alternating order, one
thread, process CPU clock. Modes:

- ``regional``: each RMSNorm and each MLP's ``act(gate) * up`` through one compiled function (no adapters inside);
- ``layers``: ``malora.compile.compile_blocks`` (``layer.compile(dynamic=True)`` on every decoder layer, as
  ``train.compile``), the adapters as they are (their input dropout through the ``malora::drop_mask`` op, the
  fused input node off while tracing: one graph per layer);
- ``layers-mask-dropout``: the same, with the adapters' input dropout as ``F.dropout`` while compiling (a per-element
  draw inside the compiled kernels; equally distributed);
- ``layers-no-dropout``: the same without the adapters' input dropout in the compiled copy (the eager copy keeps
  it): not a valid training configuration, a bound on what compiling gains once dropout costs nothing extra.

Prints the compile time, each step's seconds, tokens/s of both and Dynamo's graph and graph-break counts. A probe
for issue 19's 3x target; the library path it led to is ``malora.compile.compile_blocks`` (``train.compile``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the harness, the measured scripts
import _harness as h  # noqa: E402,F401  (this checkout's packages first on sys.path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = h.ROOT


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: computed in fp32, cast back, scaled."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def compile_regional(model: torch.nn.Module) -> None:
    norm, act = torch.compile(rms_norm, dynamic=True), torch.compile(silu_mul, dynamic=True)
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            module.forward = lambda x, m=module: norm(x, m.weight, m.variance_epsilon)
        elif name.endswith("MLP"):
            module.forward = lambda x, m=module: m.down_proj(act(m.gate_proj(x), m.up_proj(x)))


def replace_dropout_when_compiling(model: torch.nn.Module, drop: bool) -> None:
    """While compiling, the adapters' input dropout becomes ``F.dropout`` (``drop``) or nothing; fused node off."""
    from malora.inject import adapter_layers
    from malora.layers.dropout import InputDropout

    eager = InputDropout.forward

    def forward(self, x):
        if torch.compiler.is_compiling():
            return F.dropout(x, self.p, training=self.training) if drop else x
        return eager(self, x)

    InputDropout.forward = forward                                       # this process only
    for _, layer in adapter_layers(model):
        layer.fused_input = False


def main(argv: list[str] | None = None) -> int:
    from torch._dynamo.utils import counters

    from malora.compile import compile_blocks
    from orchestrator.data.batching import epoch_batches
    from orchestrator.models.hardware import cpu_info
    from orchestrator.models.loading import load_model
    from orchestrator.models.precision import Precision, keep_freed_memory

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("regional", "layers", "layers-mask-dropout", "layers-no-dropout"),
                   default="regional")
    p.add_argument("--adapter", default="ours", help=f"of {sorted(h.ADAPTERS)}")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_memory()
    torch._dynamo.config.cache_size_limit = 64
    data = types.SimpleNamespace(space=str(ROOT / "search_spaces" / "intra_domain_cpu.yaml"),
                                 model="smollm2-135m-instruct", batch_size=32, train_limit=400, max_length=256)
    spec, _, tokenizer, encoded = h.load_data(data)
    base = load_model(data.model, dtype="bfloat16")[0]
    lengths = [len(e["input_ids"]) for e in encoded]
    plan = [b for b in epoch_batches(lengths, 32, 0, 1, spec.train.seed, 0, True)
            if max(lengths[i] for i in b) <= 90][: args.rounds + 2]
    held, clock = Precision("bf16", "benchmark", "bfloat16"), h.Clock("cpu")
    eager = h.LoopRunner("eager", base, tokenizer, spec, plan, encoded, clock, adapter=args.adapter, precision=held)
    compiled = h.LoopRunner("compiled", base, tokenizer, spec, plan, encoded, clock, adapter=args.adapter,
                             precision=held)
    model = compiled.trial.model
    if args.mode == "regional":
        compile_regional(model)
    else:
        if args.mode != "layers":
            replace_dropout_when_compiling(model, drop=args.mode == "layers-mask-dropout")
        compile_blocks(model)                                           # what train.compile runs
    start = time.perf_counter()
    compiled.run(2, 0)                                                   # compiles (and recompiles once)
    compile_s = time.perf_counter() - start
    eager.run(2, 0)
    for r in range(1, args.rounds + 1):
        for runner in (eager, compiled) if r % 2 else (compiled, eager):
            runner.run(1, r)
    result = {"mode": args.mode, "adapter": args.adapter, "compile_and_two_steps_s": compile_s,
              "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}
    for runner in (eager, compiled):
        timed = [x for x in runner.records if x["round"] >= 1]
        result[runner.name] = {"step_s": [x["clock_s"] for x in timed],
                               "tokens_per_s": sum(x["tokens"] for x in timed) / sum(x["clock_s"] for x in timed)}
    ratio = result["compiled"]["tokens_per_s"] / result["eager"]["tokens_per_s"]
    print(f"{args.mode}: compiled {result['compiled']['tokens_per_s']:.1f} against eager "
          f"{result['eager']['tokens_per_s']:.1f} tokens/s ({ratio:.2f}x); {result['graphs']} graphs, "
          f"{result['graph_breaks']} graph breaks; compile + 2 steps {compile_s:.0f} s")
    if args.json:
        print(json.dumps({**result, "cpu": cpu_info(), "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
