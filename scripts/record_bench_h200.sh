#!/usr/bin/env bash
# Record `epkern bench` and `epkern tune` on one H200 (the device tool's machine), from the repository root:
#
#   EPKERN_COMMIT=<commit> bash scripts/record_bench_h200.sh [WHEELS]
#
# WHEELS: a folder of wheels to install first with pip --no-deps --no-index (e.g. a copy of
# /work/wheels: nccl4py and nccl-extensions, for NCCL EP side by side); skipped when absent.
# RANKS2_TOKENS, TUNE_NUM_SMS: the 2-rank token counts and the SM counts tune tries (defaults below).
# EPKERN_COMMIT: the commit the results name (default: git rev-parse here; an archived tree
# without .git must pass it, else the results say 'unknown').
# Steps, each with its exit status printed, the next one running after a failure:
#   precompile   the kernels of hidden 7168, 256 experts, top-8 at EP 1 and 2, in parallel
#   h200         fp8, layout, lplb, moe on the GPU                        -> bench/h200
#   h200_ranks2  dispatch, combine, low_latency on 2 ranks sharing it     -> bench/h200_ranks2
#                (correctness only: the ranks time-slice the one GPU)
#   h200_ranks1  dispatch, combine on 1 rank: epkern, its torch backend and NCCL EP side by side
#                                                                          -> bench/h200_ranks1
#   tune         num_sms for that shape at EP 2                           -> bench/tuned_h200.json
# The bench and tune steps are capped (timeout: 505 s together) so that the run ends, packed, inside
# the device tool's 10 minutes; on an H200 it should take about 4-5. Writes to $OUT (default .gpu_out): record.log, summary.txt and
# bench.tar.gz (the bench/ folder: unpack with `tar -xzf bench.tar.gz -C benchmarks/results`).
# When the caller set OUT (the device tool: at most 8 files come back) only those three stay there;
# otherwise $OUT/bench stays unpacked too. Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT_GIVEN=${OUT:+1}
OUT="${OUT:-$REPO/.gpu_out}"
WHEELS=${1:-}
mkdir -p "$OUT/bench"
WORK=$(mktemp -d)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
if [ -z "${EPKERN_COMMIT:-}" ]; then
    EPKERN_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || true)
    [ -n "$EPKERN_COMMIT" ] && export EPKERN_COMMIT
fi
PY=${PYTHON:-python3}
FAILED=0
# shellcheck source=scripts/install_project.sh
source "$REPO/scripts/install_project.sh"

# -- one step: its exit status and time logged, the next step runs after a failure; a command (not a
# shell function) is capped at LIMIT seconds, its whole process group (the ranks too) killed then ----
step() {
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name${limit:+ (at most $limit s)}: $*"
    local start=$SECONDS
    if [ -n "$limit" ]; then
        timeout -k 10 "$limit" "$@"
    else
        "$@"
    fi
    local rc=$?
    echo "$name: rc=$rc ($((SECONDS - start)) s)" | tee -a "$SUMMARY"
    [ "$rc" -eq 0 ] || FAILED=1
    return 0
}

install_wheels() {
    if [ -z "$WHEELS" ]; then
        echo "no WHEELS folder given: nothing to install"
        return 0
    fi
    local wheels=("$WHEELS"/*.whl)
    if [ ! -e "${wheels[0]}" ]; then
        echo "no wheels in '$WHEELS': nothing to install"
        return 0
    fi
    "$PY" -m pip install --no-deps --no-index "${wheels[@]}"
}

environment() {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
    "$PY" -c "import torch; print('torch', torch.__version__, '| gpus', torch.cuda.device_count())"
    "$PY" -m pip list 2>/dev/null | grep -i -E '^(nccl|nvidia-nccl|cuda-core|cuda-bindings)' || true
    echo "EPKERN_COMMIT=${EPKERN_COMMIT:-unset}"
}

EPKERN=("$PY" -m epkern.cli)
RANKS2_TOKENS=${RANKS2_TOKENS:-128,512,4096}   # a shorter run: fewer token counts / SM counts
TUNE_NUM_SMS=${TUNE_NUM_SMS:-16,24,32,64}
SHAPE='{"hidden": 7168, "num_experts": 256, "num_topk": 8'
echo "$SHAPE, \"ep_sizes\": [1, 2]}" > "$WORK/precompile.json"
echo "$SHAPE, \"ep_sizes\": [2]}" > "$WORK/tune.json"

main() {
    echo "record_bench_h200: $(date -u +%FT%TZ) on $(hostname); commit ${EPKERN_COMMIT:-unknown}; wheels: ${WHEELS:-none}"
    step wheels "" install_wheels
    step install "" install_project
    step environment "" environment
    step precompile 100 "${EPKERN[@]}" precompile --config "$WORK/precompile.json"
    step h200 120 "${EPKERN[@]}" bench --what fp8,layout,lplb,moe --out "$OUT/bench/h200"
    step h200_ranks2 120 "${EPKERN[@]}" bench --what dispatch,combine,low_latency --ranks 2 --tokens "$RANKS2_TOKENS" \
        --out "$OUT/bench/h200_ranks2"
    step h200_ranks1 75 "${EPKERN[@]}" bench --what dispatch,combine --ranks 1 --repeats 30 \
        --out "$OUT/bench/h200_ranks1"
    step tune 90 "${EPKERN[@]}" tune --config "$WORK/tune.json" --tokens 4096 --num-sms "$TUNE_NUM_SMS" --repeats 10 \
        --out "$OUT/bench/tuned_h200.json"
    tar -czf "$OUT/bench.tar.gz" -C "$OUT" bench && echo "packed $OUT/bench.tar.gz"
    [ -n "$OUT_GIVEN" ] && rm -rf "$OUT/bench"
    echo
    echo "=== summary"
    cat "$SUMMARY"
    [ "$FAILED" -eq 0 ] && echo "ALL STEPS PASSED" || echo "SOME STEPS FAILED"
    return "$FAILED"
}

main 2>&1 | tee "$OUT/record.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
