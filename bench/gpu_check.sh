#!/usr/bin/env bash
# Everything one GPU session can tell about sfnn, in under 8 minutes on one H200, offline.
#
#   bash bench/gpu_check.sh OUTDIR [--dry-run]
#
# Steps (each logged, none stops the others; every step's output goes to OUTDIR/steps.log):
#   1. environment: GPU, driver, python, torch (+ its CUDA), triton, nvcc
#   2. install: pip install --no-deps --no-build-isolation -e . (SFNN_BUILD_CUDA=0), then try the
#      CUDA extension in place (SFNN_BUILD_CUDA=1 setup.py build_ext --inplace); a failed
#      extension build is logged and tolerated
#   3. python bench/aot_check.py --archs 90         (CI compiles sm_80 as well)
#   4. python -m pytest tests -x -q (CUDA tensors)
#   5. python bench/gpu_probe.py                    -> OUTDIR/gpu_probe.{csv,md}: fp32 atomics
#      into L2 and HBM, dense cuBLAS, every phase of the layer under both combine schedules
#   6. python bench/sweep.py --device cuda          -> OUTDIR/sweep.{csv,md}, 2 PNG plots
# OUTDIR ends up with at most 8 plain files, no subfolders (the device tool returns 8):
# gpu_check.log, steps.log, gpu_probe.csv, gpu_probe.md, sweep.csv, sweep.md,
# speedup_vs_density.png, speedup_vs_block_size.png.
#
# --dry-run runs the CPU-side steps here (environment, the probe's dry run and the smoke sweep
# on the CPU, the output files) and skips install, AOT, tests and the GPU runs.
#
# Time limits (seconds) can be overridden: GPU_CHECK_BUILD_S (CUDA extension, default 75),
# GPU_CHECK_AOT_S (70), GPU_CHECK_TEST_S (100), GPU_CHECK_PROBE_S (110), GPU_CHECK_SWEEP_S (95);
# their sum plus install and environment stays under 8 minutes. The probe and the sweep stop
# starting work 25-30 s before their limits (shapes are cut, not steps). SWEEP_PRESET (default);
# PYTHON (python). Exit status: 0 when every step that ran passed (the extension build excepted).
set -u -o pipefail

usage() { echo "usage: bash bench/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1
DRY=0
if [ $# -ge 2 ]; then
    [ "$2" = "--dry-run" ] || usage
    DRY=1
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
STEPS=$OUT/steps.log
: > "$LOG"
: > "$STEPS"
PY=${PYTHON:-python}
command -v "$PY" > /dev/null 2>&1 || PY=python3
BUILD_S=${GPU_CHECK_BUILD_S:-75}
AOT_S=${GPU_CHECK_AOT_S:-70}
TEST_S=${GPU_CHECK_TEST_S:-100}
PROBE_S=${GPU_CHECK_PROBE_S:-110}
SWEEP_S=${GPU_CHECK_SWEEP_S:-95}
PRESET=${SWEEP_PRESET:-default}
T0=$(date +%s)
FAILED=()

log() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

# step NAME LOGFILE TIMEOUT_S CMD...: run CMD with a time limit, output to LOGFILE, status logged.
step() {
    local name=$1 file=$2 limit=$3
    shift 3
    log "$name: $*"
    local start rc
    start=$(date +%s)
    [ "$file" != "$LOG" ] && echo "===== $name: $* =====" >> "$file"
    timeout --kill-after=10 "$limit" "$@" >> "$file" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        log "$name: TIMED OUT after ${limit}s (rc=$rc)"
    else
        log "$name: rc=$rc in $(( $(date +%s) - start ))s"
    fi
    if [ "$file" != "$LOG" ]; then
        tail -n 5 "$file" | sed 's/^/    /' >> "$LOG"
    fi
    return $rc
}

log "sfnn gpu_check $( [ $DRY -eq 1 ] && echo '(dry run) ')in $ROOT -> $OUT"
{
    echo "== environment =="
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host: $(uname -a)"
    echo "git: $(git describe --always --dirty 2>/dev/null || echo n/a)"
    if command -v nvidia-smi > /dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm \
            --format=csv 2>&1
        nvidia-smi 2>&1 | head -n 15
    else
        echo "nvidia-smi: not found"
    fi
    echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 2 | tr '\n' ' ' || true)"
    "$PY" - <<'EOF' 2>&1
import platform
import sys

print("python:", sys.version.split()[0], platform.platform())
try:
    import torch
    print("torch:", torch.__version__, "cuda:", torch.version.cuda,
          "cudnn:", torch.backends.cudnn.version() if torch.cuda.is_available() else None,
          "cuda available:", torch.cuda.is_available())
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"gpu {i}: {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB "
              f"{p.multi_processor_count} SMs")
except Exception as err:
    print("torch: import failed:", err)
from importlib import metadata, util

for name in ("triton", "numpy", "matplotlib", "tqdm", "pytest", "hypothesis", "sfnn"):
    try:
        spec = util.find_spec(name)
        where = spec.origin if spec else "not found"
        print(f"{name}: {metadata.version(name)} ({where})")
    except Exception as err:
        print(f"{name}: not installed ({type(err).__name__}: {err})")
EOF
} >> "$LOG" 2>&1
sed -n '/== environment ==/,$p' "$LOG" | grep -E "^(torch|triton|gpu [0-9]|nvcc|python):" | \
    sed 's/^/    /'

if [ $DRY -eq 1 ]; then
    log "dry run: skipping install ($PY -m pip install --no-deps --no-build-isolation -e .),"
    log "dry run: the CUDA extension build, bench/aot_check.py and the test suite"
    step probe "$STEPS" 400 "$PY" bench/gpu_probe.py --out "$OUT" --dry-run || FAILED+=(probe)
    step sweep "$STEPS" 300 "$PY" bench/sweep.py --preset smoke --device cpu \
        --threads 1 --out "$OUT" || FAILED+=(sweep)
else
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
    SFNN_BUILD_CUDA=0 step install "$LOG" 120 "$PY" -m pip install --no-deps \
        --no-build-isolation -e . || FAILED+=(install)
    if ls csrc/*.cu > /dev/null 2>&1; then
        # Built in place (sfnn/_C*.so), which the editable install picks up.
        if ! SFNN_BUILD_CUDA=1 MAX_JOBS=16 step cuda_build "$LOG" "$BUILD_S" \
                "$PY" setup.py build_ext --inplace; then
            log "cuda_build: failed; the cuda provider and tests will be skipped (tolerated)"
        fi
    else
        log "cuda_build: no csrc/*.cu, nothing to build"
    fi
    "$PY" -c "import sfnn.cuda_ext as c; print('sfnn.cuda_ext.available():', c.available())" \
        >> "$LOG" 2>&1 || true
    if [ -f bench/aot_check.py ]; then
        step aot "$STEPS" "$AOT_S" "$PY" bench/aot_check.py --archs 90 || FAILED+=(aot)
    else
        log "aot: bench/aot_check.py missing" && FAILED+=(aot)
    fi
    step pytest "$STEPS" "$TEST_S" "$PY" -m pytest tests -x -q \
        --ignore=tests/test_bench.py -p no:cacheprovider || FAILED+=(pytest)
    # The probe and the sweep stop starting work a little before their time limits and still
    # write their files.
    step probe "$STEPS" "$PROBE_S" "$PY" bench/gpu_probe.py --out "$OUT" \
        --max-seconds $(( PROBE_S - 30 )) || FAILED+=(probe)
    MAXMIN=$(awk "BEGIN { print ($SWEEP_S - 25) / 60 }")
    step sweep "$STEPS" "$SWEEP_S" "$PY" bench/sweep.py --preset "$PRESET" \
        --device cuda --out "$OUT" --max-minutes "$MAXMIN" || FAILED+=(sweep)
fi

# The device tool fetches at most 8 plain files, at most 2 folders deep: check before leaving.
NFILES=$(find "$OUT" -type f | wc -l)
NDIRS=$(find "$OUT" -mindepth 1 -type d | wc -l)
for f in sweep.csv sweep.md speedup_vs_density.png speedup_vs_block_size.png gpu_probe.csv \
        gpu_probe.md; do
    [ -s "$OUT/$f" ] || { log "missing output: $f"; FAILED+=("output:$f"); }
done
if [ "$NFILES" -gt 8 ] || [ "$NDIRS" -gt 0 ]; then
    log "OUTDIR holds $NFILES files and $NDIRS folders (limit 8 files, none nested)"
    FAILED+=(outdir)
fi
grep -E "^(ACCEPTANCE|forward|ceilings|[0-9]+ rows|\[gpu_probe)" "$STEPS" 2>/dev/null | \
    sed 's/^/    /' | tee -a "$LOG"
log "files: $(cd "$OUT" && ls | tr '\n' ' ')"
if [ ${#FAILED[@]} -eq 0 ]; then
    log "PASS in $(( $(date +%s) - T0 ))s"
    exit 0
fi
log "FAILED: ${FAILED[*]} ($(( $(date +%s) - T0 ))s)"
exit 1
