#!/usr/bin/env bash
# The GPU preset of examples/pretrain_lm.py on one GPU, offline, within a time limit.
#
#   bash examples/gpu_pretrain.sh OUTDIR [--dry-run]
#
# Trains every variant of `--preset gpu` for one seed (bf16 autocast, sfnn's Triton kernels) and
# leaves two plain files in OUTDIR: pretrain.log (the console, ending with the results table)
# and pretrain.tar.gz (runs.csv, curves.csv, results.md, val_loss.png, meta.json). Runs are
# saved as each finishes, so a run cut off by the limit still leaves the finished ones.
#
# Needs torch with CUDA, triton, tokenizers, matplotlib, tqdm (the `examples` and `triton`
# extras); sfnn is installed from this checkout (--no-deps -e .) when it is missing. The
# tokenizer is trained on the first run (seconds) and cached in GPU_PRETRAIN_CACHE (default
# /tmp/sfnn_pretrain_cache).
# Environment: GPU_PRETRAIN_S (time limit in seconds, default 300), GPU_PRETRAIN_ARGS (extra
# arguments, e.g. "--variants dense avgk-64 switch" or "--seeds 0 1"), PYTHON (python).
# --dry-run: the same script on the CPU with a tiny override of the preset (seconds), to check
# that it builds and writes its files where no GPU is present.
set -u -o pipefail

[ $# -ge 1 ] || { echo "usage: bash examples/gpu_pretrain.sh OUTDIR [--dry-run]" >&2; exit 2; }
OUT=$1
DRY=0
if [ $# -ge 2 ]; then
    [ "$2" = "--dry-run" ] || { echo "unknown option $2" >&2; exit 2; }
    DRY=1
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
command -v "$PY" > /dev/null 2>&1 || PY=python3
LIMIT=${GPU_PRETRAIN_S:-300}
CACHE=${GPU_PRETRAIN_CACHE:-/tmp/sfnn_pretrain_cache}
RESULTS=$(mktemp -d)
LOG=$OUT/pretrain.log
cd "$ROOT" || exit 2

# sfnn from this checkout when it is not installed (setup.py maps triton_kernels/ into it).
if ! "$PY" -c "import sfnn" > /dev/null 2>&1; then
    echo "sfnn is not installed: pip install --no-deps --no-build-isolation -e ." | tee -a "$LOG"
    SFNN_BUILD_CUDA=0 "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" \
        >> "$LOG" 2>&1 || { echo "install failed" | tee -a "$LOG"; exit 1; }
fi

ARGS=(--preset gpu --seeds 0 --out "$RESULTS" --cache-dir "$CACHE" --no-progress)
if [ $DRY -eq 1 ]; then
    ARGS+=(--device cpu --threads 1 --set d_model=64 n_layers=2 n_heads=2 seq_len=64
           active=256 block_size=64 batch_size=2 steps=2 warmup=1 eval_every=2 eval_tokens=128
           final_eval_tokens=256)  # the preset's variants, every selection method
fi
# shellcheck disable=SC2206
ARGS+=(${GPU_PRETRAIN_ARGS:-})
{
    echo "gpu_pretrain: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), limit ${LIMIT}s"
    command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total \
        --format=csv,noheader
    "$PY" -c "import torch, sfnn; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), 'sfnn', sfnn.__version__)"
    echo "$PY examples/pretrain_lm.py ${ARGS[*]}"
} >> "$LOG" 2>&1
START=$(date +%s)
PYTHONUNBUFFERED=1 timeout --kill-after=10 "$LIMIT" "$PY" examples/pretrain_lm.py "${ARGS[@]}" \
    >> "$LOG" 2>&1
RC=$?
if [ $RC -eq 124 ] || [ $RC -eq 137 ]; then
    echo "gpu_pretrain: TIMED OUT after ${LIMIT}s; the finished runs are kept" >> "$LOG"
fi
echo "gpu_pretrain: rc=$RC in $(( $(date +%s) - START ))s" >> "$LOG"
tar -czf "$OUT/pretrain.tar.gz" -C "$RESULTS" . && rm -rf "$RESULTS"
tail -n 20 "$LOG"
exit $RC
