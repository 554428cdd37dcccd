#!/usr/bin/env bash
# The sharded training engines on GPUs, in one command: tests/test_engines.py with STAMP_ENGINES_DEVICE=cuda. Two
# processes (torchrun, NCCL, one GPU each) train a tiny STAMP from a tied-embedding Qwen2-VL base with DeepSpeed
# ZeRO-2, ZeRO-3 and FSDP2 full shard (configs/ds_zero2.json, ds_zero3.json, fsdp_full_shard.json), float32; each
# must follow the one-process loss curve (rtol 1e-4) and save the checkpoint one process saves (weights within 1e-5,
# forward within 1e-4). On the CPU the same file checks ZeRO-2 / ZeRO-3 and that FSDP is refused.
# Needs two CUDA GPUs, a Python with CUDA torch, transformers >= 5.25, accelerate, deepspeed, peft, pytest (the package
# is taken from src/). Not run yet: no GPU machine was lent for this project's runs.
# Run: bash benchmarks/engines_gpu.sh        (PYTHON=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export HF_HUB_OFFLINE=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" STAMP_ENGINES_DEVICE=cuda

"$PYTHON" - <<'PY'
import deepspeed, torch, transformers
assert torch.cuda.device_count() >= 2, f"two GPUs needed (one per process), found {torch.cuda.device_count()}"
print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, deepspeed {deepspeed.__version__}")
PY

"$PYTHON" -m pytest -q -rs tests/test_engines.py
