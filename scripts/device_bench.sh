#!/usr/bin/env bash
# The GPU checks of ftjax in one short run (about 8 minutes on an H100): the
# model tests on the GPU, then the benchmark of a ~1.1B-parameter
# Llama-architecture model (TinyLlama's shape) in bfloat16 compute with float32
# master weights, printing tokens/s and MFU per method, and per backend kernel:
# cuDNN flash attention (`model.attention=cudnn`, falling back to XLA where
# cuDNN cannot express a batch's mask) and the dense against the chunked loss.
#
#   bash scripts/device_bench.sh            # results under ${OUT:-/tmp/ftjax_device_bench}
#
# Installs nothing: it needs a Python whose jax has a CUDA backend (PYTHON=...,
# else the repo's .venv when it has one, else `python`). PyTorch is CPU-only in
# the project environment, so the torch column is off here.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
OUT=${OUT:-/tmp/ftjax_device_bench}
mkdir -p "$OUT"

backend=$(JAX_PLATFORMS=cuda "$PYTHON" -c "import jax; print(jax.default_backend())" 2>/dev/null || true)
if [[ "$backend" != "gpu" ]]; then
  echo "error: $PYTHON has no CUDA-enabled jax (install jax[cuda12] first)" >&2
  exit 2
fi
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "GPU: $gpu"

# Datasheet dense bf16 peak (FLOP/s) for MFU against the spec sheet.
case "$gpu" in
  *H100*|*H200*|*GH200*) peak=989e12 ;;
  *A100*) peak=312e12 ;;
  *L40S*) peak=362e12 ;;
  *) peak=0 ;;
esac

# 1. Tests that need a GPU: there is no gpu marker yet, so the model tests run on
#    it (full float32 matmul precision: their tolerances assume no TF32).
echo "== tests/test_models.py on the GPU"
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest \
  timeout 150 "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_models.py

# 2. The 1B benchmark. One job at a time (a dedicated GPU is not noisy, and each
#    process's device peak then belongs to one method); scanned layers keep each
#    compile short; batch 4 x 1024 keeps full tuning's activations well inside 80 GB.
echo "== benchmark: 1b, bf16, batch 4 x 1024"
JAX_PLATFORMS=cuda timeout 330 "$PYTHON" scripts/benchmark.py \
  --preset=1b --dtype=bfloat16 --param_dtype=float32 --batch=4 --seq=1024 \
  --steps=10 --warmup=2 --scan_layers --no-interleave --no-torch \
  --memory_preset= --decode_tokens=32 --peak_flops="$peak" \
  --variants=full@attention_cudnn,lora@attention_cudnn,lora@loss_dense \
  --out="$OUT/gpu_1b.json"

"$PYTHON" - "$OUT/gpu_1b.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("method                 tokens/s   MFU(measured peak)   MFU(datasheet)")
for row in r["train"]:
    f = lambda x, s: "-" if x is None else format(x, s)
    name = row["method"] + ("@" + row["variant"] if row.get("variant") else "")
    print(f"{name:22s} {f(row['tokens_per_s'], '10,.0f')} "
          f"{f(row['mfu_measured_peak'], '19.1%')} {f(row['mfu_datasheet'], '16.1%')}")
EOF
