#!/usr/bin/env bash
# Runs the README's offline quick start in a scratch directory and prints what it measured:
# parameter counts, time per epoch and test accuracy of a random gpt2-tiny on SMS spam.
# Usage: scripts/quickstart_offline.sh [EPOCHS]   (needs ../shared/data beside the repo, or SHARED_DATA=...)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
shared="${SHARED_DATA:-$repo/../shared/data}"
epochs="${1:-3}"
export LORA_CLI_BPE_DIR="${LORA_CLI_BPE_DIR:-$shared/gpt2_bpe}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

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
