#!/usr/bin/env bash
# compute-sanitizer memcheck, racecheck and synccheck over a small workload of every kernel family
# (scripts/sanitize_workload.py): fp8 cast, layout, LPLB count/solve/map, intranode dispatch/combine
# and low-latency dispatch/combine, the last two with 2 ranks sharing GPU 0 over gloo, each rank
# process wrapped in its own compute-sanitizer.
#
#   bash scripts/sanitize.sh OUTDIR [TOOLS] [FAMILIES]     e.g. bash scripts/sanitize.sh "$OUT"
#   make sanitize OUT=dir
#
# TOOLS: comma list, default memcheck,racecheck,synccheck; FAMILIES: default fp8,layout,lplb,intranode,low_latency.
# First a plain run of every family (no sanitizer) builds the kernels and checks the results, then
# each tool runs every family at once (one process per rank). Logs: OUTDIR/<tool>-<family>-rank<r>.log
# (the sanitizer's report) and .out (the workload's output), packed at the end into
# OUTDIR/sanitize-logs.tar.gz; OUTDIR/summary.txt holds the verdicts,
# one line per tool and family: CLEAN, ERRORS (n), FAILED (exit status), TIMEOUT or UNSUPPORTED.
# Environment: COMPUTE_SANITIZER (the binary), SANITIZE_STEP_TIMEOUT (s per tool, default 100),
# SANITIZE_PARALLEL=0 (families one after another), EPKERN_TIMEOUT_S (peer waits, default 120 here).
# Exit status 0 when every verdict is CLEAN. About 4-6 minutes on one H200.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUTDIR=${1:-${OUT:-$REPO/.sanitize_out}}
TOOLS=${2:-memcheck,racecheck,synccheck}
FAMILIES=${3:-fp8,layout,lplb,intranode,low_latency}
RANKS=2
STEP_TIMEOUT=${SANITIZE_STEP_TIMEOUT:-100}
PARALLEL=${SANITIZE_PARALLEL:-1}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
SUMMARY="$OUTDIR/summary.txt"
: > "$SUMMARY"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export EPKERN_TIMEOUT_S=${EPKERN_TIMEOUT_S:-120}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

find_sanitizer() {
    local c
    for c in "${COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer 2>/dev/null)" /usr/local/cuda/bin/compute-sanitizer \
             /usr/local/cuda-*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
        [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
    done
    c=$("$PY" - <<'PYEOF' 2>/dev/null
import glob, os, site, sys
for base in site.getsitepackages() + [site.getusersitepackages()]:
    for path in glob.glob(os.path.join(base, "nvidia", "**", "compute-sanitizer"), recursive=True):
        if os.path.isfile(path) and os.access(path, os.X_OK):
            print(path); sys.exit(0)
PYEOF
)
    [ -n "$c" ] && { echo "$c"; return 0; }
    return 1
}

is_multi() { [ "$1" = intranode ] || [ "$1" = low_latency ]; }

SLOT=0
# launch one family under one tool ("plain": no sanitizer); each process's exit status lands in $WORK
launch() {
    local tool=$1 family=$2 n=1 r init="$WORK/init-$1-$2"
    is_multi "$family" && n=$RANKS
    rm -f "$init"
    for ((r = 0; r < n; r++)); do
        local base="$OUTDIR/$tool-$family-rank$r"
        local cmd=("$PY" scripts/sanitize_workload.py --family "$family" --rank "$r" --ranks "$n" --init "$init")
        if [ "$tool" != plain ]; then
            local extra=()
            [ "$PORTS" = 1 ] && extra=(--port $((49152 + 16 * SLOT)))
            cmd=("$SAN" --tool "$tool" --report-api-errors no --log-file "$base.log" --error-exitcode 86 --print-limit 100 "${extra[@]}" "${cmd[@]}")
        fi
        SLOT=$((SLOT + 1))
        ( timeout -k 15 "$STEP_TIMEOUT" "${cmd[@]}" > "$base.out" 2>&1; echo $? > "$WORK/rc-$tool-$family-$r" ) &
    done
}

verdict() {
    local tool=$1 family=$2 n=1 r rc errors=0 worst=0 detail="" seconds=$3
    is_multi "$family" && n=$RANKS
    for ((r = 0; r < n; r++)); do
        local base="$OUTDIR/$tool-$family-rank$r"
        rc=$(cat "$WORK/rc-$tool-$family-$r" 2>/dev/null || echo 255)
        if [ -f "$base.log" ]; then
            if grep -q "Device not supported\|not supported on this device" "$base.log" "$base.out" 2>/dev/null; then
                detail="UNSUPPORTED (compute-sanitizer refused the device; see $base.log)"
            fi
            local e
            e=$(grep -Eo "(ERROR SUMMARY|RACECHECK SUMMARY): [0-9]+ (error|hazard)" "$base.log" | grep -Eo "[0-9]+" | tail -1)
            errors=$((errors + ${e:-0}))
        fi
        [ "$rc" -ne 0 ] && [ "$worst" -eq 0 ] && worst=$rc
    done
    local line
    if [ -n "$detail" ]; then line=$detail
    elif [ "$errors" -gt 0 ] || [ "$worst" -eq 86 ]; then line="ERRORS ($errors reported; see $OUTDIR/$tool-$family-rank*.log)"
    elif [ "$worst" -eq 124 ] || [ "$worst" -eq 137 ]; then line="TIMEOUT (past ${STEP_TIMEOUT} s; see $OUTDIR/$tool-$family-rank*.out)"
    elif [ "$worst" -ne 0 ]; then line="FAILED (exit status $worst; see $OUTDIR/$tool-$family-rank*.out)"
    elif [ "$tool" = plain ]; then line="PASSED (no sanitizer: kernels built, results checked, ${seconds} s)"
    else line="CLEAN ($n process$([ "$n" -gt 1 ] && echo es), 0 errors, ${seconds} s)"; fi
    printf '%-10s %-12s %s\n' "$tool" "$family" "$line" | tee -a "$SUMMARY"
    [[ $line == CLEAN* || $line == PASSED* ]]
}

run_tool() {
    local tool=$1 start=$SECONDS f
    IFS=, read -ra fams <<< "$FAMILIES"
    if [ "$PARALLEL" = 1 ]; then
        for f in "${fams[@]}"; do launch "$tool" "$f"; done
        wait
        for f in "${fams[@]}"; do verdict "$tool" "$f" $((SECONDS - start)) || FAILED=1; done
    else
        for f in "${fams[@]}"; do
            start=$SECONDS; launch "$tool" "$f"; wait
            verdict "$tool" "$f" $((SECONDS - start)) || FAILED=1
        done
    fi
}

FAILED=0
echo "sanitize: tools $TOOLS, families $FAMILIES, logs in $OUTDIR" | tee -a "$SUMMARY"
run_tool plain  # builds the kernels, checks the results without a sanitizer
if ! SAN=$(find_sanitizer); then
    echo "compute-sanitizer not found (set COMPUTE_SANITIZER=/path/to/compute-sanitizer)" | tee -a "$SUMMARY"
    exit 1
fi
PORTS=0
"$SAN" --help 2>/dev/null | grep -q -- "--port" && PORTS=1
[ "$PORTS" = 0 ] && PARALLEL=0  # without distinct ports, concurrent sanitizers may not connect
echo "compute-sanitizer: $SAN ($("$SAN" --version 2>/dev/null | tail -1))" | tee -a "$SUMMARY"
IFS=, read -ra tools <<< "$TOOLS"
for tool in "${tools[@]}"; do run_tool "$tool"; done
echo "sanitize: $([ "$FAILED" = 0 ] && echo "every tool and family CLEAN" || echo "NOT CLEAN (see above)")" | tee -a "$SUMMARY"
# one archive of the logs (few files come back from the GPU machine); SANITIZE_KEEP_LOGS=1 keeps them loose too
( cd "$OUTDIR" && if tar -czf sanitize-logs.tar.gz -- *.log *.out 2>/dev/null; then
      [ "${SANITIZE_KEEP_LOGS:-0}" = 1 ] || rm -f -- *.log *.out
  fi )
echo "logs: $OUTDIR/sanitize-logs.tar.gz (the files named above), verdicts: $SUMMARY"
exit $FAILED
