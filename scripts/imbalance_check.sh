#!/usr/bin/env bash
# Does --class-weights balanced help on imbalanced data? The raw SMS spam collection (87% ham, 13%
# spam, all 5,574 rows): a stratified 20% test split made here, --val-split 0.1 of the rest for
# validation, a random gpt2-tiny base, the same steps with and without balanced class weights; prints
# the macro F1 (and spam recall) that `lora-cli eval --json` reports on the test split.
#
#   scripts/imbalance_check.sh [SMSSpamCollection]   (env: STEPS=20, BATCH=16, KEEP=DIR to keep the files)
set -euo pipefail
SOURCE=${1:-$(dirname "$0")/../../shared/data/sms_spam/SMSSpamCollection}
STEPS=${STEPS:-20}
BATCH=${BATCH:-16}
export LORA_CLI_BPE_DIR=${LORA_CLI_BPE_DIR:-$(dirname "$0")/../../shared/data/gpt2_bpe}
WORK=${KEEP:-$(mktemp -d)}
mkdir -p "$WORK"
[ -n "${KEEP:-}" ] || trap 'rm -rf "$WORK"' EXIT
export LORA_CLI_HOME=$WORK/home

# label<TAB>text without a header -> train.csv / test.csv with a header, test = 20% of each class
python - "$SOURCE" "$WORK" <<'EOF'
import csv, random, sys
from collections import Counter
source, work = sys.argv[1], sys.argv[2]
with open(source, encoding="utf-8") as f:
    rows = [line.rstrip("\r\n").split("\t", 1) for line in f if line.strip()]
rng, train, test = random.Random(0), [], []
for label in sorted({label for label, _ in rows}):
    mine = [r for r in rows if r[0] == label]
    rng.shuffle(mine)
    cut = round(0.2 * len(mine))
    test += mine[:cut]
    train += mine[cut:]
for name, part in (("train", train), ("test", test)):
    with open(f"{work}/{name}.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["label", "text"], *part])
    print(f"{name}: {len(part)} rows {dict(sorted(Counter(label for label, _ in part).items()))}")
EOF

lora-cli init --preset gpt2-tiny --out "$WORK/base.safetensors" --seed 123 >/dev/null
for weights in none balanced; do
    start=$(date +%s)
    lora-cli train --model "$WORK/base.safetensors" --train "$WORK/train.csv" --val-split 0.1 --class-weights $weights \
        --rank 16 --alpha 16 --epochs 1 --max-steps "$STEPS" --batch-size "$BATCH" --device cpu --quiet \
        --out "$WORK/run-$weights" >"$WORK/train-$weights.log" 2>&1 || { cat "$WORK/train-$weights.log"; exit 1; }
    lora-cli eval --adapter "$WORK/run-$weights" --data "$WORK/test.csv" --device cpu --json >"$WORK/eval-$weights.json"
    python - "$WORK/eval-$weights.json" "$weights" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
spam = r["per_class"]["spam"]
print(f"--class-weights {sys.argv[2]:<8}: test macro F1 {r['macro_avg']['f1']:.4f}, accuracy {r['accuracy']:.4f}, "
      f"spam recall {spam['recall']:.4f}, spam precision {spam['precision']:.4f} (n={r['n']}, {sys.argv[3]} s)")
EOF
done
grep -h "^data:" "$WORK/train-none.log"
