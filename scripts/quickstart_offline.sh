#!/usr/bin/env bash
# Runs the README's offline quick start in a scratch directory and prints what it measured:
# parameter counts, time per epoch and test accuracy of a random gpt2-tiny on SMS spam.
# Usage: scripts/quickstart_offline.sh [EPOCHS]   (needs ../shared/data beside the repo, or SHARED_DATA=...)
set -euo pipefail
epochs="${1:-3}"
# shellcheck source=scripts/scratch_env.sh
source "$(dirname "$0")/scratch_env.sh"

lora-cli init --preset gpt2-tiny --out gpt2-tiny.safetensors
lora-cli data sms-spam --source "$shared/sms_spam/SMSSpamCollection" --out data/sms
lora-cli train --rank 16 --alpha 16 --model gpt2-tiny.safetensors --data data/sms --epochs "$epochs" --out runs/tiny --quiet
lora-cli eval --adapter runs/tiny --data data/sms/test.csv
python - <<'PY'
import json
rows = [json.loads(l) for l in open("runs/tiny/metrics.jsonl") if '"epoch"' in l and '"val_loss"' in l]
for r in rows:
    print(f"epoch {r['epoch']}: {r['epoch_seconds']:.1f} s, {r['examples_per_second']:.0f} examples/s, val acc {r['val_accuracy']:.4f}")
PY
