#!/usr/bin/env bash
# Wheels the GPU image lacks (benchmarks/device_image.py CARRIED: pydantic and its companions, hjson, DeepSpeed),
# downloaded here for its Python 3.12 / x86-64 into .whl/ (ignored by git), to be carried to the device:
#   bash benchmarks/device_wheels.sh      then the device run carries `.whl` (see benchmarks/device_check.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mapfile -t carried < <("$PY" benchmarks/device_image.py --carried)
binary=()
for pin in "${carried[@]}"; do [[ $pin == deepspeed==* ]] || binary+=("$pin"); done
# binary wheels for the device's CPython 3.12
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl "${binary[@]}"
# DeepSpeed is an sdist on PyPI: build a pure-Python wheel here (its ops JIT-build on the device when used)
for pin in "${carried[@]}"; do
    [[ $pin == deepspeed==* ]] && DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$pin"
done
ls -la .whl
