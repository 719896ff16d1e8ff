#!/usr/bin/env bash
# The GPU check: in under 8 minutes on one CUDA GPU, everything gpconv can learn from a GPU lent for a few minutes.
#
#   benchmarks/gpu_check.sh OUTDIR            on the GPU machine (python3 there holds torch with CUDA)
#   benchmarks/gpu_check.sh OUTDIR --dry-run  here, on the CPU, with tiny settings (tests/test_benchmarks.py runs it)
#   benchmarks/gpu_check.sh --stage-data      copies ../shared/data/cifar10-subset into shared/data/ of this
#                                             checkout first: a device machine gets the repository and its
#                                             shared/ folder only
#
# Steps, each under its own time limit (seconds, below; together with the set-up under 480 s):
#   1. the CUDA-marked tests (pytest -m cuda)                                             -> tests.log
#   2. benchmarks/benchmark.py --device cuda --amp (bf16 autocast, channels_last): inference time and training
#      images/s of EfficientNet-B0 vs kEffNet-B0 V2 16ch and 32ch, peak memory              -> benchmark.log, .json
#   3. a short real-data training of kEffNet-B0 V2 16ch on the CIFAR-10 subset (32x32)     -> train.log,
#                                                                          train_history.csv, train_metrics.json
# plus environment.txt (GPU, driver, torch, CPU) and summary.txt (each step's status and seconds): 8 files, the
# most a device call brings back. OUTDIR must be empty or absent (nothing in it is replaced). Exit status: 0 when
# every step passed, 1 when one failed or ran out of time (the others still run), 2 for a usage error.
# PYTHON picks the interpreter (default: .venv/bin/python where it exists, else python3).
set -u -o pipefail

TESTS_S=140        # the CUDA tests
BENCHMARK_S=190    # benchmark.py
TRAIN_S=100        # the real-data training
SETUP_S=15         # environment, copying, and 5 s per step for timeout's kill, the most the script adds
TOTAL_LIMIT_S=480  # the device check's budget: 8 minutes

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SUBSET_NAME=cifar10-subset

fail() { echo "gpu_check: $*" >&2; exit 2; }

if [ "${1:-}" = "--stage-data" ]; then
    source_dir="$ROOT/../shared/data/$SUBSET_NAME"
    [ -d "$source_dir/cifar-10-batches-py" ] || fail "no CIFAR-10 subset at $source_dir"
    mkdir -p "$ROOT/shared/data" && rm -rf "$ROOT/shared/data/$SUBSET_NAME.tmp" \
        && cp -r "$source_dir" "$ROOT/shared/data/$SUBSET_NAME.tmp" && chmod -R u+w "$ROOT/shared/data/$SUBSET_NAME.tmp" \
        && rm -rf "$ROOT/shared/data/$SUBSET_NAME" && mv "$ROOT/shared/data/$SUBSET_NAME.tmp" "$ROOT/shared/data/$SUBSET_NAME" \
        || fail "could not copy $source_dir into $ROOT/shared/data"
    echo "copied $source_dir to $ROOT/shared/data/$SUBSET_NAME ($(du -sh "$ROOT/shared/data/$SUBSET_NAME" | cut -f1))"
    exit 0
fi

[ $# -ge 1 ] && [ $# -le 2 ] || fail "usage: benchmarks/gpu_check.sh OUTDIR [--dry-run] | --stage-data"
OUTDIR=$1
DRY_RUN=0
if [ $# -eq 2 ]; then
    [ "$2" = "--dry-run" ] || fail "unknown option $2 (usage: benchmarks/gpu_check.sh OUTDIR [--dry-run])"
    DRY_RUN=1
fi
case "$OUTDIR" in -*) fail "OUTDIR must come first (usage: benchmarks/gpu_check.sh OUTDIR [--dry-run])";; esac
(( SETUP_S + TESTS_S + BENCHMARK_S + TRAIN_S <= TOTAL_LIMIT_S )) || fail "the step limits exceed $TOTAL_LIMIT_S s"
if [ -e "$OUTDIR" ]; then
    [ -d "$OUTDIR" ] || fail "$OUTDIR exists and is not a folder"
    [ -z "$(ls -A "$OUTDIR")" ] || fail "$OUTDIR is not empty: give an empty or new folder (nothing in it is replaced)"
fi
mkdir -p "$OUTDIR" || fail "cannot create $OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=python3
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$ROOT"

DATA=""
for candidate in "${GPCONV_CIFAR_SUBSET:-}" "$ROOT/shared/data/$SUBSET_NAME" "$ROOT/../shared/data/$SUBSET_NAME"; do
    if [ -n "$candidate" ] && [ -d "$candidate/cifar-10-batches-py" ]; then DATA=$candidate; break; fi
done

if [ $DRY_RUN -eq 1 ]; then
    DEVICE=cpu
    BENCHMARK_ARGS=(--device cpu --threads 1 --settings 32x2s3 --train-batch 4 --rounds 1 --skip-memory)
    TRAIN_ARGS=(--device cpu --threads 1 --image-size 16 --epochs 1 --batch-size 8 --max-train-batches 2)
    export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
else
    DEVICE=cuda
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
        || fail "$PY sees no CUDA GPU (torch.cuda.is_available() is False); on a CPU use --dry-run"
    [ -n "$DATA" ] || fail "no CIFAR-10 subset: run benchmarks/gpu_check.sh --stage-data here first (or set GPCONV_CIFAR_SUBSET)"
    BENCHMARK_ARGS=(--device cuda --amp --amp-dtype bfloat16 --rounds 5 --settings 224x1,224x64,32x256s3
                    --train-batch 256)
    TRAIN_ARGS=(--device cuda --image-size 32 --epochs 8 --batch-size 64)
fi
if [ -n "$DATA" ]; then
    DATA_ARGS=(--dataset cifar10 --data-dir "$DATA")
else  # dry run without the subset: the same command on gpconv's synthetic images
    DATA_ARGS=(--dataset synthetic --synthetic-size 64,32)
fi

RUN=$(mktemp -d "${TMPDIR:-/tmp}/gpconv-gpu-check.XXXXXX") || fail "cannot create a temporary folder"
trap 'rm -rf "$RUN"' EXIT
STARTED=$SECONDS
STATUS=0
SUMMARY=()

step() {  # step NAME LIMIT_S LOG COMMAND...: run COMMAND under LIMIT_S seconds, output to LOG, record the outcome
    local name=$1 limit=$2 log=$3 begun=$SECONDS code outcome
    shift 3
    echo "== $name (limit ${limit}s) ==" >&2
    timeout --kill-after=5 "$limit" "$@" >"$OUTDIR/$log" 2>&1
    code=$?
    case $code in
        0) outcome=ok ;;
        124|137) outcome="timed out after ${limit}s"; STATUS=1 ;;
        *) outcome="failed (exit $code)"; STATUS=1 ;;
    esac
    SUMMARY+=("$(printf '%-10s %-28s %4ds  (limit %ds; %s)' "$name" "$outcome" $((SECONDS - begun)) "$limit" "$log")")
    echo "   $outcome in $((SECONDS - begun))s" >&2
}

{
    echo "gpu_check $( [ $DRY_RUN -eq 1 ] && echo "DRY RUN (CPU, tiny settings)" ) started $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "repository: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with changes)')"
    echo "python: $PY"
    echo "data: ${DATA:-synthetic images (no CIFAR-10 subset found)}"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - "$DEVICE" <<'PYTHON' 2>&1
import sys

import torch

sys.path.insert(0, "benchmarks")
from benchmark import describe_machine

device = torch.device(sys.argv[1])
print("machine:", describe_machine(device))
if device.type == "cuda":
    properties = torch.cuda.get_device_properties(device)
    print(f"cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, {properties.multi_processor_count} "
          f"multiprocessors, {properties.total_memory / 2**30:.0f} GiB, bf16 supported: {torch.cuda.is_bf16_supported()}")
PYTHON
} >"$OUTDIR/environment.txt"

mapfile -t CUDA_TESTS < <(grep -l "pytest.mark.cuda" "$ROOT"/tests/test_*.py)
step tests "$TESTS_S" tests.log "$PY" -m pytest -m cuda -q -p no:cacheprovider -rs "${CUDA_TESTS[@]}"
step benchmark "$BENCHMARK_S" benchmark.log "$PY" benchmarks/benchmark.py "${BENCHMARK_ARGS[@]}" \
    --json "$OUTDIR/benchmark.json"
step train "$TRAIN_S" train.log "$PY" -m gpconv train --arch efficientnet_b0 --channels-per-group 16 --skip-strides 3 \
    "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" --output "$RUN/k16"
for file in history.csv:train_history.csv metrics.json:train_metrics.json; do
    if [ -f "$RUN/k16/${file%%:*}" ]; then cp "$RUN/k16/${file%%:*}" "$OUTDIR/${file##*:}"; fi
done

{
    printf '%s\n' "${SUMMARY[@]}"
    echo "total      $((SECONDS - STARTED))s of a ${TOTAL_LIMIT_S}s budget; $( [ $STATUS -eq 0 ] && echo 'all steps passed' || echo 'a step failed or ran out of time')"
} | tee "$OUTDIR/summary.txt"
exit $STATUS
