#!/usr/bin/env bash
# The two base-model controls of docs/demo-study.md, each from a seeded random init on one CPU thread:
#   bash examples/base-model/controls/run.sh capacity-512   # the shipped geometry trained at 512 tokens
#   bash examples/base-model/controls/run.sh wide-256       # hidden 256, 4 heads of 64, trained at 256 tokens
# Both use the shipped base's recipe (recipes/tiny-base-256.yaml) with the overrides below, then evaluate
# passkey (one-token keys, 20 keys per cell) at 256 / 512 / 1,024 / 2,048 and held-out perplexity.
set -euo pipefail
cd "$(dirname "$0")/../../.."
LONGTUNE=${LONGTUNE:-longtune}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=1
mkdir -p runs/base-model
[ -f runs/base-model/tokenizer/tokenizer.json ] || "$PYTHON" -c \
  "from longtune.train.tokenizer import embedded_tokenizer; embedded_tokenizer().save_pretrained('runs/base-model/tokenizer')"
case "${1:?capacity-512 or wide-256}" in
  capacity-512)
    RUN=runs/control-512
    "$LONGTUNE" prep examples/base-model/controls/prep-512.yaml
    "$LONGTUNE" train recipes/tiny-base-256.yaml data.path=$RUN/data train.output_dir=$RUN/train \
      train.seq_len=512 model.config_overrides.max_position_embeddings=512 ;;
  wide-256)
    RUN=runs/control-wide
    [ -f runs/base-model/data/longtune_corpus.json ] || "$LONGTUNE" prep recipes/prep/tiny-base-256.yaml
    "$LONGTUNE" train recipes/tiny-base-256.yaml train.output_dir=$RUN/train train.lr=2.0e-3 \
      model.config_overrides.hidden_size=256 model.config_overrides.intermediate_size=704 \
      model.config_overrides.num_attention_heads=4 model.config_overrides.num_key_value_heads=2 ;;
  *) echo "unknown control: $1" >&2; exit 2 ;;
esac
"$LONGTUNE" eval "$RUN/train/model" --tasks passkey,ppl --passkey-keys word --lengths 256,512,1024,2048 \
  --trials 20 --out "$RUN/eval"
