#!/usr/bin/env bash
# One prepared run on a lent GPU machine (its python3 already holds torch and transformers):
# the CPU-independent tests plus the CUDA ones, then benchmarks/gpu.py. Writes to $OUT.
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/core tests/nn tests/methods \
    tests/formats tests/eval tests/model tests/kernels tests/test_data.py 2>&1 | tee "$OUT/tests.log" | tail -15
python3 benchmarks/gpu.py --out "$OUT/gpu.json" 2>&1 | tail -8
