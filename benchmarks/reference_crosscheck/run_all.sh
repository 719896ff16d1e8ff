#!/bin/bash
# The whole cross-check, one training at a time: export the splits, train the reference (TensorFlow
# venv) and gpconv (the repository's .venv) for each seed, then write the table, CSV and figure.
# Usage (from this folder):
#   EPOCHS=6 SEEDS="0 1" CLASSIFIER_INIT=torch TFENV=/tmp/tfenv KCAI=/tmp/kcai ./run_all.sh
# A finished run (metrics.json present) is skipped and gpconv's runs resume, so the script can be
# re-run after a stop.
set -euo pipefail
EPOCHS=${EPOCHS:-6}
SEEDS=${SEEDS:-"0 1"}
CLASSIFIER_INIT=${CLASSIFIER_INIT:-torch}   # torch (the study's) or family (the papers')
TFENV=${TFENV:-/tmp/tfenv}
KCAI=${KCAI:-/tmp/kcai}
DATA=${DATA:-/work/shared/data/cifar10-subset}
RUNS=${RUNS:-../../docs/results/reference_crosscheck_runs}
GPCONV_PY=../../.venv/bin/python
mkdir -p splits "$RUNS"
for seed in $SEEDS; do
  [ -f "splits/split-$seed.npz" ] || OMP_WAIT_POLICY=PASSIVE nice -n 10 $GPCONV_PY export_split.py \
      --data-dir "$DATA" --seed "$seed" --output "splits/split-$seed.npz"
  out="$RUNS/reference-$CLASSIFIER_INIT-s$seed"
  [ -f "$out/metrics.json" ] || TF_NUM_INTRAOP_THREADS=2 TF_NUM_INTEROP_THREADS=1 PYTHONPATH="$KCAI" \
      nice -n 10 "$TFENV/bin/python" train_reference.py --split "splits/split-$seed.npz" --seed "$seed" \
      --epochs "$EPOCHS" --classifier-init "$CLASSIFIER_INIT" --output "$out"
  out="$RUNS/gpconv-$CLASSIFIER_INIT-s$seed"
  resume=""; [ -f "$out/last.pt" ] && resume="--resume"   # gpconv resumes; the reference restarts
  [ -f "$out/metrics.json" ] || OMP_WAIT_POLICY=PASSIVE nice -n 10 ../../.venv/bin/gpconv train \
      --arch efficientnet_b0 --channels-per-group 16 --version 2 --skip-strides 1 --dataset cifar10 \
      --data-dir "$DATA" --image-size 32 --batch-size 64 --epochs "$EPOCHS" --lr-cycle "$EPOCHS" \
      --classifier-init "$CLASSIFIER_INIT" --seed "$seed" --threads 2 --output "$out" $resume
done
$GPCONV_PY report.py --runs "$RUNS"
