#!/usr/bin/env bash
# The main job end to end on an embedded local Ray, on synthetic data: `make demo` runs it.
#   usage: scripts/demo.sh [OUT_DIR]     (default: demo)
# synth -> prepare -> tune -> train --best -> score (twice: incremental) -> summarize; then evaluate, predict, export.
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

t_tune=$SECONDS
echo "== 3. tune: Ray Tune + Optuna over backbone (tiny ViTs), learning rate (range per backbone) and weight decay"
echo "   (configs/tune-demo.yaml; 4 trials on half the training split at 32 px for 2 epochs, 2 at a time, ASHA)"
raydefect tune --config demo --data "$OUT/dataset" --set train.runs_dir="$OUT/runs" \
  --set resources.cpus_per_worker=1
echo "== 3b. train --best: the winner at full fidelity (64 px, 8 epochs, all training images) on Ray Train"
raydefect train --best demo --set train.runs_dir="$OUT/runs" --cpus-per-worker 2
MODEL="$OUT/runs/demo-best/model"
echo "   (tune + train --best: $((SECONDS - t_tune)) s)"

echo "== 4. score: $OUT/raw/archive -> $OUT/scores (one row per image: scores, class, mask PNG; corrupt files -> error rows)"
raydefect score --model "$MODEL" --input "$OUT/raw/archive" --out "$OUT/scores"

echo "== 5. score again: nightly runs are incremental, only new or changed images are scored (none here)"
raydefect score --model "$MODEL" --input "$OUT/raw/archive" --out "$OUT/scores"

echo "== 6. what was found"
raydefect scores summarize "$OUT/scores" --top 5 --folders 5
raydefect scores extract "$OUT/scores" --out "$OUT/score-masks" --top 8

echo "== 7. for people: a report on the test split, overlays for a folder, an ONNX file"
raydefect evaluate --model "$MODEL" --data "$OUT/dataset" --split test --out "$OUT/report"
raydefect predict --model "$MODEL" --images "$OUT/raw/defect_images" --out "$OUT/predict"
raydefect export --model "$MODEL" --out "$OUT/model.onnx"

echo "== done in ${SECONDS} s"
echo "   dataset      $OUT/dataset"
echo "   study        $OUT/runs/tune-demo/ (trials.csv, best.yaml, plots/)"
echo "   model        $MODEL (metrics.csv, plots/ and test_metrics.json beside it)"
echo "   scores       $OUT/scores/ (Parquet: pandas, pyarrow, DuckDB and Spark read it as it is)"
echo "   report       $OUT/report/report.html"
echo "   overlays     $OUT/predict/overlays/ and $OUT/score-masks/"
echo "   ONNX         $OUT/model.onnx (+ .json contract)"
