#!/usr/bin/env bash
# The prepared script for the first machine with a GPU (the `device` tool), whatever the issue at hand:
#   bash benchmarks/device_wheels.sh                      # here, once: the wheels the GPU image lacks, into .whl/
#   device run (carry: [".whl"], timeout_s: 540):  bash benchmarks/device_check.sh
# It records, without Ray: the training loop's GPU proof and MFU (gpu_smoke.py, train_mfu.py) and a GPU serving row
# (serve_throughput.py --engine-only). Rows go to benchmarks/BENCHMARKS.md, copied with the logs to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import deepspeed, torch, transformers; print('deepspeed', deepspeed.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
status=0
timeout 300 python3 benchmarks/gpu_smoke.py --out "$OUT" 2>&1 | tee "$OUT/gpu_smoke.log" || status=1
timeout 150 python3 benchmarks/train_mfu.py --size 1b --steps 12 2>&1 | tail -5 | tee "$OUT/train_mfu.log" || status=1
if python3 benchmarks/serve_throughput.py --help 2>/dev/null | grep -q -- --engine-only; then
    timeout 90 python3 benchmarks/serve_throughput.py --engine-only --device cuda 2>&1 | tail -8 | tee "$OUT/serve.log" || status=1
fi
cp benchmarks/BENCHMARKS.md "$OUT/"
exit $status
