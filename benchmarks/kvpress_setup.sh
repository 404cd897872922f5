#!/usr/bin/env bash
# Create .venv-kvpress: a separate virtual environment with NVIDIA's kvpress, which pins an
# older transformers than kvcache does. benchmarks/kvpress_driver.py runs inside it.
#
#   bash benchmarks/kvpress_setup.sh          # idempotent; prints what is installed
#   .venv-kvpress/bin/python benchmarks/kvpress_driver.py --help
#
# torch comes from the local CPU wheel first; the constraints file keeps it at that version
# while pip resolves kvpress's own pins (transformers < 5.3, accelerate, datasets, peft...).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${KVPRESS_VENV:-.venv-kvpress}
KVPRESS_VERSION=0.5.5
TORCH_VERSION=2.13.0
CONSTRAINTS=benchmarks/kvpress_constraints.txt
STAMP="$VENV/.installed-kvpress-$KVPRESS_VERSION"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

if [ ! -f "$STAMP" ]; then
    "${PIP[@]}" install -q "torch==$TORCH_VERSION"   # resolves to the local +cpu wheel
    "${PIP[@]}" install -q -c "$CONSTRAINTS" "kvpress==$KVPRESS_VERSION" "rich>=13"
    touch "$STAMP"
fi

# Check that it imports and that torch is the CPU build.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
import kvpress  # noqa: F401
assert not torch.version.cuda, f"expected the CPU build of torch, got CUDA {torch.version.cuda}"
for name in ("kvpress", "torch", "transformers", "accelerate", "rich"):
    print(f"{name}=={md.version(name)}")
PY
echo "kvpress environment ready: $VENV"
