#!/usr/bin/env bash
# Trains the shipped base model `tiny-base-256` from scratch on CPU and installs it into
# recipes/models/tiny-base-256 (weights, config, tokenizer, recipe, metrics, passkey check).
#   bash examples/base-model/train.sh            # 2,500 steps: about 25 min on one idle CPU core
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
"$LONGTUNE" train recipes/tiny-base-256.yaml          # 2,500 steps from a seeded random init
"$LONGTUNE" eval "$RUN/train/model" --tasks passkey,ppl --passkey-keys word --lengths 128,256,2048 \
  --trials 20 --out "$RUN/eval"

mkdir -p "$DEST"
rm -f "$DEST"/*.safetensors
cp "$RUN"/train/model/* "$DEST"/
cp recipes/prep/tiny-base-256.yaml "$DEST"/prep.yaml
cp "$RUN"/train/recipe.yaml "$DEST"/recipe.yaml
cp "$RUN"/train/metrics.jsonl "$DEST"/metrics.jsonl
cp "$RUN"/eval/results.md "$DEST"/eval.md
echo "installed $DEST"
