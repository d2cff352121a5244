#!/usr/bin/env bash
# The CUDA checks in one call on a lent GPU machine (no registry there: the repo is used from PYTHONPATH):
#     OUT=/some/folder bash experiments/gpu_run.sh [parts for gpu_checks.py --only]
# Logs and the result files land in $OUT as well as in results/. The overhead part runs in a process of its own.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/memprof-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 120 python3 -m pytest tests/gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log"
(cd experiments && timeout 200 python3 gpu_checks.py --only ${1:-accuracy,estimate,apply}; timeout 150 python3 gpu_checks.py --only overhead) 2>&1 | tee "$OUT/gpu-checks.log"
cp results/gpu-*.json "$OUT/" 2>/dev/null
timeout 100 python3 -m memprof demo --out /tmp/memprof-demo 2>&1 | tail -40 > "$OUT/demo.log"
echo "demo rc=${PIPESTATUS[0]}"; tail -25 "$OUT/demo.log"
