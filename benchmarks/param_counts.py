"""Trainable-parameter table on LLaMA-2-7B dimensions (meta device: no memory, no download).

Every row injects a config into a ``meta`` LLaMA-2-7B, counts the real parameters, checks the count against
the analytic formula of METHODS.md §1.5 and against the figures of METHODS.md and the papers.

- "share %" is trainable / base parameters (6,738,415,616), the papers' convention, to 2 decimals.
- MALoRA's paper prints shares *truncated* to one decimal (METHODS.md §1.5): the "paper" check truncates.
- MoSLD's Table 5 prints trainable counts 100x too large ("0.419B" for 4.19M, METHODS.md §2.5): the paper check
  compares the printed digits with trainable / 1e7.

Usage: ``python benchmarks/param_counts.py [--json]`` (with --json the last line is one JSON object).
Exit code 0 when every row matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from dataclasses import dataclass

from malora.config import LoRAConfig, MALoRAConfig, MoLoRAConfig, MoSLDConfig
from malora.inject import inject_adapters
from malora.params import analytic_trainable, count_parameters, linear_dims, meta_llama

QV = ("q_proj", "v_proj")
LAYERWISE = (2,) * 8 + (4,) * 8 + (6,) * 8 + (8,) * 8   # MoLA/MoSLD allocation, average 5 (METHODS.md §2.4)


@dataclass(frozen=True)
class Row:
    method: str
    setting: str
    cfg: object
    unit: str                     # "%" (share of base) or "M" (trainable millions)
    expected: float               # METHODS.md figure in `unit`, to 2 decimals
    paper: float | None           # as printed: % truncated to 1 decimal, or MoSLD Table 5's "B" digits
    source: str
    layerwise_molora: tuple[int, ...] | None = None   # MoLA: a MoLoRA per decoder layer with its own N
    frozen_adapter: str | None = None                 # adapter tensor frozen after injection (ablation)


ROWS = (
    Row("LoRA", "r=64, alpha=128, q,k,v,gate,up,down", LoRAConfig(r=64, alpha=128.0, target_modules=MALoRAConfig().target_modules),
        "%", 2.12, 2.1, "MALoRA Table 1"),
    Row("MoLoRA", "8 x r8, top-2, routers", MoLoRAConfig(), "%", 2.24, 2.2, "MALoRA Table 1"),
    Row("MoLoRA", "8 x r12, top-2, routers", MoLoRAConfig(r=12, alpha=24.0), "%", 3.31, 3.3, "MALoRA Table 3"),
    Row("MoLoRA", "8 x r16, top-2, routers", MoLoRAConfig(r=16, alpha=32.0), "%", 4.37, None, "MALoRA Fig. 4a"),
    Row("MALoRA", "r_bar=12, d=32, N=8", MALoRAConfig(), "%", 2.36, 2.3, "MALoRA Table 1"),
    Row("MALoRA-Small", "r_bar=8, d=22, N=8", MALoRAConfig(d=22, r_bar=8, alpha=16.0), "%", 1.62, 1.6,
        "MALoRA Table 1"),
    Row("MALoRA w/o asymmetry", "r_bar=8, d=64, N=8", MALoRAConfig(d=64, r_bar=8, alpha=16.0), "%", 2.26, 2.2,
        "MALoRA Table 3"),
    Row("MALoRA w fixed S_A", "r_bar=16, d=32, S_A frozen", MALoRAConfig(r_bar=16, alpha=32.0), "%", 2.47, 2.4,
        "MALoRA Table 3", frozen_adapter="lora_S_A"),
    Row("LoRA", "r=8, q,v", LoRAConfig(r=8), "M", 4.19, 0.419, "MoSLD Table 5"),
    Row("MoLA", "r=8, q,v, experts 2/4/6/8 per 8 layers", MoLoRAConfig(target_modules=QV), "M", 22.28, 2.228,
        "MoSLD Table 5", layerwise_molora=LAYERWISE),
    Row("MoSLD", "r=8, q,v, experts 2/4/6/8 per 8 layers", MoSLDConfig(num_experts=LAYERWISE), "M", 13.89, 1.389,
        "MoSLD Table 5"),
)


def count_row(row: Row, base) -> dict:
    """Inject ``row`` into a copy of the meta ``base`` model and return the counts and checks."""
    model = copy.deepcopy(base)
    base_total = count_parameters(base).total
    if row.layerwise_molora is None:
        inject_adapters(model, row.cfg)
        analytic = analytic_trainable(row.cfg, linear_dims(base, row.cfg.target_modules))
    else:  # one MoLoRA config per decoder layer (MoLoRAConfig has a single N)
        model.requires_grad_(False)
        analytic = 0
        for layer, (block, n_exp) in enumerate(zip(model.model.layers, row.layerwise_molora, strict=True)):
            cfg = MoLoRAConfig(**{**row.cfg.to_dict(), "num_experts": n_exp, "top_k": min(2, n_exp)})
            inject_adapters(block, cfg)
            analytic += analytic_trainable(cfg, linear_dims(base.model.layers[layer], cfg.target_modules))
    if row.frozen_adapter:
        for name, param in model.named_parameters():
            if name.endswith(row.frozen_adapter):
                param.requires_grad_(False)
                analytic -= param.numel()
    count = count_parameters(model)
    share_pct = 100.0 * count.trainable / base_total
    value = share_pct if row.unit == "%" else count.trainable / 1e6
    if row.paper is None:
        paper_ok = True
    elif row.unit == "%":
        paper_ok = math.isclose(math.floor(share_pct * 10 + 1e-9) / 10, row.paper)
    else:
        paper_ok = math.isclose(round(count.trainable / 1e7, 3), row.paper)
    match = count.trainable == analytic and round(value, 2) == row.expected and paper_ok
    return {"method": row.method, "setting": row.setting, "kind": row.cfg.kind, "trainable": count.trainable,
            "total": count.total, "base_total": base_total, "analytic": analytic, "share_pct": round(share_pct, 4),
            "unit": row.unit, "value": round(value, 4), "expected": row.expected, "paper": row.paper,
            "source": row.source, "match": match}


def format_table(results: list[dict]) -> str:
    head = f"| {'method':<20} | {'setting':<38} | {'trainable':>12} | {'total':>14} | {'share %':>7} | " \
           f"{'METHODS.md':>10} | {'paper':>9} | match |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in results:
        expected = f"{r['expected']:.2f}{'%' if r['unit'] == '%' else 'M'}"
        paper = "-" if r["paper"] is None else (f"{r['paper']}%" if r["unit"] == "%" else f"{r['paper']}B*")
        lines.append(f"| {r['method']:<20} | {r['setting']:<38} | {r['trainable']:>12,} | {r['total']:>14,} | "
                     f"{r['share_pct']:>7.2f} | {expected:>10} | {paper:>9} | {'✓' if r['match'] else '✗':^5} |")
    lines.append("share % = trainable / base (6,738,415,616). Paper % truncated to 1 decimal. "
                 "*MoSLD Table 5 prints counts 100x too large (0.419B = 4.19M).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON object (last line)")
    args = parser.parse_args(argv)
    base = meta_llama()
    results = [count_row(row, base) for row in ROWS]
    all_match = all(r["match"] for r in results)
    if args.json:
        print(json.dumps({"model": "LLaMA-2-7B (meta)", "base_total": results[0]["base_total"],
                          "all_match": all_match, "rows": results}))
    else:
        print(format_table(results))
    return 0 if all_match else 1


if __name__ == "__main__":
    sys.exit(main())
