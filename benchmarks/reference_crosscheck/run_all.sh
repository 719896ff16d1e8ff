#!/bin/bash
# The whole cross-check, one training at a time: export the splits, train the reference (TensorFlow
# venv) and gpconv (the repository's .venv) for each seed, then write the table, CSV and figure.
# Usage (from this folder): EPOCHS=3 SEEDS="0 1" TFENV=/tmp/tfenv KCAI=/tmp/kcai ./run_all.sh
set -euo pipefail
EPOCHS=${EPOCHS:-3}
SEEDS=${SEEDS:-"0 1"}
TFENV=${TFENV:-/tmp/tfenv}
KCAI=${KCAI:-/tmp/kcai}
DATA=${DATA:-/work/shared/data/cifar10-subset}
GPCONV_PY=../../.venv/bin/python
mkdir -p splits runs
for seed in $SEEDS; do
  OMP_WAIT_POLICY=PASSIVE nice -n 10 $GPCONV_PY export_split.py --data-dir "$DATA" --seed "$seed" \
      --output "splits/split-$seed.npz"
  TF_NUM_INTRAOP_THREADS=2 TF_NUM_INTEROP_THREADS=1 PYTHONPATH="$KCAI" nice -n 10 "$TFENV/bin/python" \
      train_reference.py --split "splits/split-$seed.npz" --seed "$seed" --epochs "$EPOCHS" \
      --output "runs/reference-s$seed"
  OMP_WAIT_POLICY=PASSIVE nice -n 10 ../../.venv/bin/gpconv train --arch efficientnet_b0 \
      --channels-per-group 16 --version 2 --skip-strides 1 --dataset cifar10 --data-dir "$DATA" \
      --image-size 32 --batch-size 64 --epochs "$EPOCHS" --lr-cycle "$EPOCHS" --classifier-init family \
      --seed "$seed" --threads 2 --output "runs/gpconv-s$seed"
done
$GPCONV_PY report.py --runs runs
