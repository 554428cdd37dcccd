#!/usr/bin/env bash
# STAMP's speed on an accelerator, in one command: real STAMP-2B shapes (Qwen2-VL-2B: 28 text layers, 32 vision
# layers, 151,936-row vocabulary), random weights, bfloat16, sdpa, images of N = 1024 and 1280 merged patches.
#   1. benchmarks/speed.py: phase 2 per <|seg|> (1 and 3 <|seg|>) against the official per-<|seg|> procedure,
#      autoregressive mask decoding and the ideal forward, and the peak memory of generate_with_masks vs generate;
#   2. benchmarks/breakdown.py: latency per request through pipeline("stamp-segmentation") with SAM ViT-H shapes
#      (random weights) and without SAM, and per <|seg|>, printed next to the paper's 1.3 s / 0.9 s (STAMP-2B at
#      896 x 896 on an A800, Table S3), the stage-by-stage split, and images/s at batch 1, 2, 4;
#   3. benchmarks/train_speed.py: a training step (forward + backward, batch of 2 records at N = 1024, 1 and 3
#      <|seg|>, with and without gradient checkpointing) against the official training step restated and a plain
#      causal step over as many tokens: time, samples/s, peak memory (a step the GPU has no memory for is reported
#      as out of memory, the others still run).
# Needs a Python with CUDA torch, transformers >= 5.24, pillow, numpy, psutil (the package is taken from src/).
# Results: JSON files under $OUT (default benchmarks/results); the whole run takes about 5-8 minutes on one H100-class GPU
# for 1 and 2 (train_speed.py's time there is not measured yet).
# Run: bash benchmarks/gpu.sh        (PYTHON=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
SHAPES=(--device cuda --dtype bfloat16 --text-layers 28 --vision-layers 32 --vocab-size 151936)

"$PYTHON" - <<'EOF'
import torch, transformers
assert torch.cuda.is_available(), "no CUDA device visible"
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF

"$PYTHON" benchmarks/speed.py "${SHAPES[@]}" --n 1024 1280 --segs 1 3 --repeats 5 --official-rounds 3 \
    --autoregressive-rounds 1 --memory-n 1024 --json "$OUT/speed_gpu.json"
for N in 1024 1280; do
    "$PYTHON" benchmarks/breakdown.py "${SHAPES[@]}" --n "$N" --sam-h --repeats 5 --skip-cli \
        --json "$OUT/breakdown_gpu_$N.json"
done
"$PYTHON" benchmarks/train_speed.py "${SHAPES[@]}" --n 1024 --segs 1 3 --batch 2 --repeats 3 \
    --json "$OUT/train_speed_gpu.json"
