#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py says what it proves); needs the kit from
# `make gpu-kit` in .gpukit (on the lent GPU machine: name .gpukit in the device tool's carry).
#
#   scripts/gpu_check.sh            on a CUDA machine: the whole check, at most ~5 minutes, JSON in $OUT
#   scripts/gpu_check.sh --dry      here: CPU, Triton interpreter, small shapes (what CI runs)
#
# Options after these go to benchmarks/gpu_check.py (--only SECTION,..., --out FILE, --budget-s S).
# GPU_CHECK_KIT overrides the kit folder; GPU_CHECK_PYTHON the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT="${GPU_CHECK_KIT:-.gpukit}"
PY="${GPU_CHECK_PYTHON:-python3}"
if [ ! -f "$KIT/MANIFEST.json" ]; then
    echo "gpu_check: no kit in $KIT: run 'make gpu-kit' here first (and carry .gpukit to the GPU machine)" >&2
    exit 2
fi
SITE="$KIT/site"
# The profiler's pure-Python dependencies the GPU image lacks travel as wheels; install them (no index).
if compgen -G "$KIT/wheels/*.whl" > /dev/null && ! "$PY" -c "import pydantic" 2>/dev/null; then
    EXTRA="${TMPDIR:-/tmp}/razor-gpukit-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$EXTRA" \
        "$KIT"/wheels/*.whl
    SITE="$SITE:$EXTRA"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec timeout 300 "$PY" benchmarks/gpu_check.py "$@"
