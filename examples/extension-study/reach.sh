#!/usr/bin/env bash
# How far back can the extended model find the key? docs/demo-study.md, section 2: the main job shrunk to 2×
# (256 → 512 tokens, YaRN, sp = 2), fine-tuned for each step count given, then passkey with the needle at depth 0
# of prompts of 280 … 512 tokens (the needle 197 … 437 tokens before the question's end), 20 keys per length.
# The section's numbers are of the previous, 5-digit-key base model; with the shipped word-key base the script
# measures the same reach on one-token keys.
#   bash examples/extension-study/reach.sh                # steps 100 300 1000: 7 min on 2 cores
#   STEPS="100" METHOD=pi bash examples/extension-study/reach.sh
# Prints one Markdown row per model; everything lands in $OUT (default runs/reach), the commands' output in
# $OUT/log.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
LONGTUNE=${LONGTUNE:-longtune}
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/reach}
METHOD=${METHOD:-yarn}
STEPS=${STEPS:-100 300 1000}
LENGTHS=280,320,360,400,450,512

mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
fail() { tail -n 1 "$LOG" >&2; echo "reach: longtune $1 failed (its output: $LOG)" >&2; exit 1; }
reach() {  # model dir, eval dir
  "$LONGTUNE" eval "$1" --tasks passkey --passkey-keys word --lengths "$LENGTHS" --depths 0 --trials 20 --out "$2" --no-progress \
    >>"$LOG" 2>&1 || fail eval
}

echo "reach: base model" >&2
reach tiny-base-256 "$OUT/base"
for steps in $STEPS; do
  echo "reach: $METHOD 256 -> 512, $steps steps" >&2
  "$LONGTUNE" demo --target-length 512 --methods "$METHOD" --steps "$steps" --out "$OUT/$METHOD-$steps" >>"$LOG" 2>&1 \
    || fail demo
  reach "$OUT/$METHOD-$steps/$METHOD/model" "$OUT/$METHOD-$steps/reach"
done

"$PYTHON" - "$OUT" "$METHOD" $STEPS <<'PY'
import json, sys
from pathlib import Path
out, method, steps = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
rows = [("base, direct extrapolation", out / "base")] + [(f"{method} 2×, {s} steps", out / f"{method}-{s}" / "reach")
                                                          for s in steps]
for i, (name, path) in enumerate(rows):
    cells = json.loads((path / "results.json").read_text())["passkey"]["cells"]
    if i == 0:
        print("| model \\ length | " + " | ".join(str(c['length']) for c in cells) + " |")
        print("|---" * (len(cells) + 1) + "|")
    print(f"| {name} | " + " | ".join(f"{c['accuracy']:.2f}" for c in cells) + " |")
PY
