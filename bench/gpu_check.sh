#!/usr/bin/env bash
# The torch CUDA checks and GPU figures, in one call on a GPU machine (bench/README.md, "On a GPU").
# Expects: python3 with torch (CUDA); the project's pure-Python needs as wheels in .whl/ (monai,
# pydicom, torch-pruning, jsonschema and its three helpers), 48 real slices in .gpu/eval_slices.npz
# (`python bench/bench_gpu.py --cut-slices MANIFEST --slices .gpu/eval_slices.npz`, where the scans are);
# writes logs and JSON under $OUT (default ./gpu-out).
set -u -o pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
echo "== CUDA tests"
timeout 180 python3 -m pytest -q -p no:cacheprovider -o addopts=-ra tests/compression/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15
echo "== GPU bench"
timeout 240 python3 bench/bench_gpu.py --slices .gpu/eval_slices.npz --rounds 50 --train-steps 1000 \
  --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log" | grep -v "^environment"
echo "== CPU tests of the training steps under this python and torch"
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts=-ra tests/compression/test_training.py \
  tests/compression/test_steps_distill.py 2>&1 | tee "$OUT/pytest_cpu.log" | tail -4
