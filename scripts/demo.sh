#!/usr/bin/env bash
# The main job end to end on an embedded local Ray, on synthetic data: `make demo` runs it.
#   usage: scripts/demo.sh [OUT_DIR]     (default: demo)
# Steps so far: synth -> prepare -> summary. Later steps (tune, train --best, score) are appended below.
set -euo pipefail

OUT="${1:-demo}"
mkdir -p "$OUT"

echo "== 1. synthetic raw data: 4 defect classes x 60 + 240 normal images at 64 px, and a 200-file archive"
raydefect synth "$OUT/raw" --per-class 60 --normal 240 --size 64 --seed 0 --archive 200 --overwrite

echo "== 2. prepare: check, de-duplicate and split into a dataset"
raydefect prepare \
  --defect-images "$OUT/raw/defect_images" \
  --defect-masks "$OUT/raw/defect_masks" \
  --normal-images "$OUT/raw/normal_images" \
  --split 0.8,0.1,0.1 --seed 0 \
  --out "$OUT/dataset"

echo "== 3. train: a tiny random-init ViT from scratch on Ray Train (configs/demo.yaml: 64 px, 8 epochs, 3 stages)"
raydefect train --config demo --data "$OUT/dataset" --set train.runs_dir="$OUT/runs"

echo "== done: dataset in $OUT/dataset, archive to score in $OUT/raw/archive"
echo "        model artifact in $OUT/runs/demo/model (metrics.csv, plots/ and test_metrics.json beside it)"
