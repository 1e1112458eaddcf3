#!/usr/bin/env bash
# Set up a development/test environment on a fresh machine.
# - No torch yet (CPU-only dev/CI machines): install the CPU build torch==2.13.0, not GBs of CUDA wheels.
# - torch already installed (e.g. a GPU image with CUDA torch): leave it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
