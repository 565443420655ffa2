#!/usr/bin/env bash
# The one GPU check of issue 19, run from the repository root on a CUDA machine:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh        # OUT defaults to ./gpu_out
#
# Needs only python3 with torch, transformers, numpy and pytest (no Ray, MLflow, Optuna, network or Hub: every
# model is config-built). Steps, each capped by `timeout`, the whole well under 5 minutes on an H200:
#   1. the GPU and the versions                                   -> $OUT/env.txt
#   2. the gpu-marked tests of tests/malora                       -> $OUT/pytest_gpu.log
#   3. the CPU tests of the adapter layers under this torch       -> $OUT/pytest_layers_cpu.log
#   4. benchmarks/adapter_speed.py --preset gpu (bf16, grouped top-k vs the other dispatch paths vs LoRA r64)
#                                                                 -> $OUT/adapter_speed.log, adapter_speed.json
# Caps: 75 + 45 + 165 s plus ~15 s for step 1 (< 5 min). Every step runs even if an earlier one failed;
# $OUT/summary.txt holds the exit codes (0 = passed).
set -u
OUT="${OUT:-./gpu_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # malora from this tree (it is not pip-installed there)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)

{
  date -u
  nvidia-smi -L
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" - <<'EOF'
import platform, numpy, pytest, torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| numpy", numpy.__version__, "| pytest", pytest.__version__)
print("device", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability(),
      "| torch._grouped_mm", hasattr(torch, "_grouped_mm"), "| bf16", torch.cuda.is_bf16_supported())
EOF
} 2>&1 | tee "$OUT/env.txt"

timeout 75 "$PY" -m pytest -q -rA -m gpu -p no:cacheprovider tests/malora 2>&1 | tee "$OUT/pytest_gpu.log"
rc_gpu=${PIPESTATUS[0]}

timeout 45 "$PY" -m pytest -q -p no:cacheprovider tests/malora/test_grouped.py tests/malora/test_layers.py \
  2>&1 | tail -n 30 | tee "$OUT/pytest_layers_cpu.log"
rc_cpu=${PIPESTATUS[0]}

# --budget-s: no suite starts after 100 s (the longest, SmolLM2's 30 layers, should take under a minute);
# models first; the JSON is rewritten after every suite, so a timeout loses only the suite it interrupts.
timeout 240 "$PY" benchmarks/adapter_speed.py --preset gpu --device cuda --suites linear,model --budget-s 150 \
  --json-out "$OUT/adapter_speed.json" 2>&1 | tee "$OUT/adapter_speed.log"
rc_bench=${PIPESTATUS[0]}

echo "gpu_tests=$rc_gpu layer_tests_cpu=$rc_cpu adapter_speed=$rc_bench wall_s=$(( $(date +%s) - start ))" \
  | tee "$OUT/summary.txt"
