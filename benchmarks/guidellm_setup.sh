#!/usr/bin/env bash
# Create .venv-guidellm: guidellm (the load generator) in its own virtual environment, so its
# pins never meet kvcache's. benchmarks/bench_guidellm.py runs it against `kvcache serve`.
#
#   bash benchmarks/guidellm_setup.sh          # idempotent
#
# torch comes from the local CPU wheel first, so nothing guidellm asks for pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${GUIDELLM_VENV:-.venv-guidellm}
GUIDELLM_VERSION=0.8.1
TORCH_VERSION=2.13.0
STAMP="$VENV/.installed-guidellm-$GUIDELLM_VERSION"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
    "$VENV/bin/python" -m pip install -q "guidellm==$GUIDELLM_VERSION"
    touch "$STAMP"
fi
"$VENV/bin/guidellm" --version 2>/dev/null || "$VENV/bin/python" -m pip show guidellm | head -2
