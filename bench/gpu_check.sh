#!/usr/bin/env bash
# The GPU check, as one prepared call on a GPU machine that has no network (bench/gpu_check.py
# says what it checks). That machine's python3 has torch, torchvision, numpy, pyyaml, rich,
# scikit-learn and tensorboard; the rest travels as wheels:
#   make gpu-wheels                 # here, once: fills bench/wheels/ (git-ignored, carried along)
#   bash bench/gpu_check.sh         # there: $OUT/gpu_check.json (under 5 minutes), then
#                                   # $OUT/throughput.json (bench/throughput.py --preset gpu, under 5):
#                                   # both within one 600 s device call
#   bash bench/gpu_check.sh --device cpu --steps 8   # anywhere: tries the checks without a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ! "$PY" -c "import pydantic, tensorboardX" 2>/dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --find-links bench/wheels \
        pydantic pydantic-core annotated-types typing-inspection typing-extensions tensorboardX
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/nvidia-smi.csv"
fi
status=0
timeout "${GPU_CHECK_TIMEOUT_S:-290}" "$PY" bench/gpu_check.py --out "$OUT" "$@" || status=$?
if [[ " $* " != *" --device cpu "* ]]; then  # the table needs the GPU; each row stops starting at the budget
    timeout "${THROUGHPUT_TIMEOUT_S:-280}" "$PY" bench/throughput.py --preset gpu --budget-s 230 \
        --out "$OUT/throughput.json" || status=$?
fi
exit "$status"
