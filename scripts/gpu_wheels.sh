#!/usr/bin/env bash
# Download, here, the wheels the GPU machine's image lacks (it has torch, transformers,
# accelerate and peft, but not bitsandbytes, trl, datasets or evaluate) into .whl/, which
# git ignores and `run(..., carry=[".whl"])` takes along. The working tree and the carried
# files must stay under 64 MiB per call: this checks.
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-python3}
# Pinned to what the test suite runs with; Python 3.12 x86-64 as on the GPU machine.
# bitsandbytes 0.50 ships its CUDA 13.0 library (torch 2.11+cu130 there).
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    evaluate==0.4.6
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
total=$(( (tree + wheels) / 1048576 ))
echo "working tree $((tree / 1048576)) MiB + wheels $((wheels / 1048576)) MiB = ${total} MiB (limit 64)"
[ "$total" -lt 64 ] || { echo "over 64 MiB: carry fewer wheels (trl, datasets, evaluate are optional)"; exit 1; }
