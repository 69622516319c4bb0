#!/usr/bin/env bash
# The GPU check in one call on a lent GPU machine (see scripts/gpu_check.py and
# docs/qlora-and-memory.md, "Checking on a GPU"). Prepare the wheels the machine lacks with
# scripts/gpu_wheels.sh first; the call then carries `.whl`:
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Results land in $OUT (gpu-check.json, gpu-check.log, bench-1b.json and .png).
set -u
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 scripts/gpu_check.py "$@"
