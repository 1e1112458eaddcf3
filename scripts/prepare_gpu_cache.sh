#!/usr/bin/env bash
# Precompile cubins HERE (CPU-only machine, pip NVRTC) into .gpu_cache/, which the lead carries to
# the GPU machine; there they load offline (EPKERN_JIT=0, EPKERN_CACHE_DIR=.gpu_cache) under an
# older NVRTC (see tests/test_layout.py::test_precompiled_cubins_load_offline).
#
#   scripts/prepare_gpu_cache.sh [--fresh] [CONFIG.json ...]   # default deployment, then each config
#
# --fresh empties the folder first, so it holds exactly what the current templates build.
# GPU_CACHE_DIR (default .gpu_cache) and ARCH (default sm_90a) override the target.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${GPU_CACHE_DIR:-.gpu_cache}"
ARCH="${ARCH:-sm_90a}"

# keep the folder out of git (and so out of the working-tree copy unless carried explicitly)
if [ -d .git ] && [ "$CACHE" = ".gpu_cache" ] && ! git check-ignore -q .gpu_cache/; then
    mkdir -p .git/info
    echo "/.gpu_cache/" >> .git/info/exclude
fi

if [ "${1:-}" = "--fresh" ]; then
    shift
    rm -rf "$CACHE/kernels"
fi

export EPKERN_CACHE_DIR="$CACHE"
unset EPKERN_JIT
python3 -m epkern.cli precompile --arch "$ARCH"
for config in "$@"; do
    python3 -m epkern.cli precompile --arch "$ARCH" --config "$config"
done
python3 -m epkern.cli cache list
