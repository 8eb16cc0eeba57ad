#!/usr/bin/env bash
# The README's offline quick start (random gpt2-tiny on SMS spam, 3 epochs) with --select-metric accuracy:
# validation and test accuracy of the selected adapter (adapter.safetensors) versus the last-epoch one
# (adapter-last.safetensors). Usage: scripts/selection_check.sh [EPOCHS]   (needs ../shared/data, or SHARED_DATA=...)
set -euo pipefail
epochs="${1:-3}"
# shellcheck source=scripts/scratch_env.sh
source "$(dirname "$0")/scratch_env.sh"

lora-cli init --preset gpt2-tiny --out gpt2-tiny.safetensors >/dev/null
lora-cli data sms-spam --source "$shared/sms_spam/SMSSpamCollection" --out data/sms >/dev/null
lora-cli train --rank 16 --alpha 16 --model gpt2-tiny.safetensors --data data/sms --epochs "$epochs" \
  --select-metric accuracy --out runs/tiny --quiet --json > train.json
python - <<'PY'
import json
s = json.load(open("train.json"))
print(f"selected: {s['selected']}")
PY
for adapter in adapter.safetensors adapter-last.safetensors; do
  for split in validation test; do
    acc=$(lora-cli eval --adapter "runs/tiny/$adapter" --data "data/sms/$split.csv" --json |
          python -c 'import json, sys; print("%.4f" % json.load(sys.stdin)["accuracy"])')
    echo "$adapter $split accuracy $acc"
  done
done
