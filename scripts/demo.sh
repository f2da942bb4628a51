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

echo "== done: dataset in $OUT/dataset, archive to score in $OUT/raw/archive"

# --- score (issue 5): the nightly job over the synthetic archive -> Parquet -------------------------------------
# Uses the model the training step wrote; without one (training not run) an untrained tiny model stands in, so
# the scoring part can be tried on its own.
MODEL="${MODEL:-}"
for candidate in "$OUT/runs/demo/model" "runs/demo/model"; do
  if [ -z "$MODEL" ] && [ -f "$candidate/model.yaml" ]; then MODEL="$candidate"; fi
done
if [ -z "$MODEL" ]; then
  MODEL="$OUT/untrained-model"
  echo "== (no trained model found: saving an untrained tiny model to $MODEL; scores will be meaningless)"
  python -c "
import sys, torch
from raydefect.config import ModelConfig
from raydefect.models.artifact import save_artifact
from raydefect.models.model import DefectModel
torch.manual_seed(0)
net = DefectModel(ModelConfig(backbone='tiny', pretrained=False), 64, ('normal', 'scratch', 'spot', 'crack', 'missing_piece'))
save_artifact(net.eval(), sys.argv[1], thresholds={'image': 0.5, 'pixel': 0.5}, extra={'note': 'untrained demo'})
" "$MODEL"
fi

echo "== score: $OUT/raw/archive -> $OUT/scores (one row per image: scores, class, mask PNG; 3 corrupt files -> error rows)"
raydefect score --model "$MODEL" --input "$OUT/raw/archive" --out "$OUT/scores"

echo "== score again: nightly runs are incremental, only new or changed images are scored (none here)"
raydefect score --model "$MODEL" --input "$OUT/raw/archive" --out "$OUT/scores"

echo "== what was found"
raydefect scores summarize "$OUT/scores" --top 5 --folders 5
raydefect scores extract "$OUT/scores" --out "$OUT/score-masks" --top 8

echo "== the Parquet files: $OUT/scores/*/*/*.parquet (pandas, pyarrow, DuckDB and Spark read them as they are)"
python -c "
import sys, pandas as pd
df = pd.read_parquet(sys.argv[1], columns=['path', 'defect_score', 'is_defect', 'defect_class', 'mask_area_px', 'error'])
df['path'] = df['path'].str.split('/').str[-3:].str.join('/')
pd.set_option('display.width', 140)
print(df.sort_values('defect_score', ascending=False, na_position='last').head(8).to_string(index=False))
" "$OUT/scores"
echo "== done: scores in $OUT/scores, masks and overlays in $OUT/score-masks"
