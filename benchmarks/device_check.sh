#!/usr/bin/env bash
# The prepared script for the first machine with a GPU (the `device` tool), whatever the issue at hand:
#   bash benchmarks/device_wheels.sh                      # here, once: the wheels the GPU image lacks, into .whl/
#   .venv/bin/python benchmarks/device_run.py --cpu-dry-run   # here: every step on tiny (make test does it too)
#   device run (carry: [".whl"], timeout_s: 540):  bash benchmarks/device_check.sh
# benchmarks/device_run.py records every GPU figure (attention paths at 1B and 7B shape, the project's loop with
# DeepSpeed ZeRO-2, the serving engine against HF generate) into $OUT/device.json and rows of BENCHMARKS.md,
# copied to $OUT. Each step runs in its own process with its own limit: one failure does not cost the others.
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
python3 benchmarks/device_run.py --out "$OUT" 2>&1 | tee "$OUT/device_run.log"
status=${PIPESTATUS[0]}
cp benchmarks/BENCHMARKS.md "$OUT/"
exit "$status"
