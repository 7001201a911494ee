#!/usr/bin/env bash
# Trains the shipped base model `tiny-base-256` from scratch on CPU and installs it into
# recipes/models/tiny-base-256 (weights, config, tokenizer, recipe, metrics, passkey check).
#   bash examples/base-model/train.sh            # 4,500 steps in three stages: 35-80 min on one CPU core
# Same torch version, one thread (fixed below) and the same CPU kind → the same weights, bit for bit. torch picks
# its CPU kernels by instruction set (AVX2 / AVX512 / AMX), and they round differently: on another CPU kind the
# run diverges by rounding from the first steps and gives a model of similar quality, not the same bytes.
set -euo pipefail
cd "$(dirname "$0")/../.."
LONGTUNE=${LONGTUNE:-longtune}
PYTHON=${PYTHON:-python}
RUN=runs/base-model
DEST=recipes/models/tiny-base-256
export OMP_NUM_THREADS=1   # fixed: the thread count is part of bit-for-bit reproducibility

rm -rf "$RUN"
mkdir -p "$RUN"
"$PYTHON" -c "from longtune.train.tokenizer import embedded_tokenizer; embedded_tokenizer().save_pretrained('$RUN/tokenizer')"
"$LONGTUNE" prep recipes/prep/tiny-base-256.yaml
"$LONGTUNE" train recipes/tiny-base-256.yaml          # stage 1: 2,000 steps from a seeded random init
"$LONGTUNE" train recipes/tiny-base-256-stage2.yaml   # stage 2: 1,000 steps from stage 1's export
"$LONGTUNE" train recipes/tiny-base-256-stage3.yaml   # stage 3: 1,500 steps from stage 2's export
"$LONGTUNE" eval "$RUN/stage3/model" --tasks passkey,ppl --lengths 128,256 --trials 20 --out "$RUN/eval"

mkdir -p "$DEST"
cp "$RUN"/stage3/model/* "$DEST"/
cp recipes/prep/tiny-base-256.yaml "$DEST"/prep.yaml
cp "$RUN"/train/recipe.yaml "$DEST"/recipe.yaml
cp "$RUN"/train/metrics.jsonl "$DEST"/metrics.jsonl
for stage in 2 3; do
  cp "$RUN"/stage$stage/recipe.yaml "$DEST"/recipe-stage$stage.yaml
  cp "$RUN"/stage$stage/metrics.jsonl "$DEST"/metrics-stage$stage.jsonl
done
cp "$RUN"/eval/results.md "$DEST"/eval.md
echo "installed $DEST"
