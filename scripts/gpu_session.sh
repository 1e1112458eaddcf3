#!/usr/bin/env bash
# The one script to run on a GPU machine (the device tool), from the repository root.
#
#   bash scripts/gpu_session.sh                    # offline check, every GPU test, every benchmark
#   bash scripts/gpu_session.sh tests              # offline check + every GPU test, no benchmarks
#   bash scripts/gpu_session.sh benchmarks         # offline check + every benchmark, no tests
#   bash scripts/gpu_session.sh tests/test_layout.py layout
#                                                  # these test files / node ids and benchmarks.layout
#
# A test is anything under tests/ (file or node id, -k expressions are not supported); a benchmark is
# NAME or benchmarks.NAME for benchmarks/NAME.py. Carry .gpu_cache (scripts/prepare_gpu_cache.sh, run
# on the CPU machine) to check that precompiled cubins load offline; without it that check is skipped.
#
# Brings back in $OUT (at most 8 files): session.log (everything printed), summary.txt (one line per
# step with its exit status), junit-gpu.xml, junit-offline.xml, results.tar.gz (every result JSON of
# this session) and, when there are at most 3, the result JSONs themselves.
# Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT="${OUT:-$REPO/.gpu_out}"
GPU_CACHE="${GPU_CACHE_DIR:-$REPO/.gpu_cache}"
mkdir -p "$OUT"
WORK=$(mktemp -d)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
FAILED=0

# -- run one step, log its status and time, keep going after a failure ----------------------------
step() {
    local name=$1
    shift
    echo
    echo "=== $name: $*"
    local start=$SECONDS
    "$@"
    local rc=$?
    echo "$name: rc=$rc ($((SECONDS - start)) s)" | tee -a "$SUMMARY"
    [ "$rc" -eq 0 ] || FAILED=1
    return 0
}

# -- arguments: which tests and which benchmarks ---------------------------------------------------
all_benchmarks() {
    for f in benchmarks/*.py; do
        local name
        name=$(basename "$f" .py)
        case "$name" in __init__|harness|test_*) ;; *) echo "$name" ;; esac
    done
}

TESTS=()
BENCHES=()
if [ $# -eq 0 ]; then
    TESTS=(tests)
    mapfile -t BENCHES < <(all_benchmarks)
fi
for arg in "$@"; do
    case "$arg" in
        tests) TESTS+=(tests) ;;
        benchmarks) mapfile -t -O "${#BENCHES[@]}" BENCHES < <(all_benchmarks) ;;
        tests/*) TESTS+=("$arg") ;;
        *)
            name=${arg#benchmarks.}
            if [ -f "benchmarks/$name.py" ]; then
                BENCHES+=("$name")
            else
                echo "gpu_session: '$arg' is neither a test path (tests/...) nor a benchmark (benchmarks/$name.py)" >&2
                exit 2
            fi
            ;;
    esac
done

# -- install without touching the image's torch; offline, so no build isolation --------------------
# shellcheck source=scripts/install_project.sh
source "$REPO/scripts/install_project.sh"

environment_info() {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| gpus', torch.cuda.device_count())"
    "$PY" -m epkern.cli info
}

# -- cubins precompiled on the CPU machine load here with JIT off ---------------------------------
offline_check() {
    if [ ! -d "$GPU_CACHE/kernels" ]; then
        echo "no precompiled cache at $GPU_CACHE (carry .gpu_cache from scripts/prepare_gpu_cache.sh): skipped"
        return 0
    fi
    EPKERN_CACHE_DIR="$GPU_CACHE" EPKERN_JIT=0 "$PY" -m epkern.cli cache list
    PRECOMPILED_CACHE_DIR="$GPU_CACHE" "$PY" -m pytest -m gpu -rA -p no:cacheprovider \
        --junitxml="$OUT/junit-offline.xml" tests/test_layout.py::test_precompiled_cubins_load_offline
}

gpu_tests() {
    "$PY" -m pytest -m "gpu or multigpu" -v -p no:cacheprovider --junitxml="$OUT/junit-gpu.xml" "${TESTS[@]}"
}

run_benchmark() {
    # the harness copies each result file into $OUT; point it at a staging folder and bundle below
    OUT="$WORK/results" "$PY" -m "benchmarks.$1"
}

bundle_results() {
    mkdir -p "$WORK/results"
    local files=("$WORK"/results/*.json)
    [ -e "${files[0]}" ] || { echo "no benchmark results"; return 0; }
    tar -czf "$OUT/results.tar.gz" -C "$WORK/results" .
    if [ "${#files[@]}" -le 3 ]; then
        cp "${files[@]}" "$OUT/"
    fi
    echo "results: $(cd "$WORK/results" && ls *.json | tr '\n' ' ')-> results.tar.gz (copy into benchmarks/results/)"
}

main() {
    echo "gpu_session: $(date -u +%FT%TZ) on $(hostname); tests: ${TESTS[*]:-none}; benchmarks: ${BENCHES[*]:-none}"
    git log --oneline -1 2>/dev/null || true
    step install install_project
    step info environment_info
    step offline offline_check
    if [ ${#TESTS[@]} -gt 0 ]; then
        step gpu-tests gpu_tests
    fi
    mkdir -p "$WORK/results"
    for b in "${BENCHES[@]}"; do
        step "benchmarks.$b" run_benchmark "$b"
    done
    bundle_results
    echo
    echo "=== summary"
    cat "$SUMMARY"
    [ "$FAILED" -eq 0 ] && echo "ALL STEPS PASSED" || echo "SOME STEPS FAILED"
    return "$FAILED"
}

main 2>&1 | tee "$OUT/session.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
