#!/usr/bin/env bash
# The README's offline quick start, then temperature scaling: fit T on the validation split and print
# the test split's NLL and ECE before and after (accuracy must not move).
# Usage: scripts/calibration_check.sh [EPOCHS]   (needs ../shared/data beside the repo, or SHARED_DATA=...)
set -euo pipefail
epochs="${1:-3}"
# shellcheck source=scripts/scratch_env.sh
source "$(dirname "$0")/scratch_env.sh"

lora-cli init --preset gpt2-tiny --out t.safetensors >/dev/null
lora-cli data sms-spam --source "$shared/sms_spam/SMSSpamCollection" --out data/sms >/dev/null
lora-cli train --rank 16 --alpha 16 --model t.safetensors --data data/sms --epochs "$epochs" --out runs/tiny --quiet >/dev/null
lora-cli eval --adapter runs/tiny --data data/sms/test.csv --json >before.json
lora-cli calibrate --adapter runs/tiny --data data/sms/validation.csv
lora-cli eval --adapter runs/tiny --data data/sms/test.csv --json >after.json
python - <<'PY'
import json
before, after = (json.load(open(f)) for f in ("before.json", "after.json"))
print(f"test split ({before['n']} examples), temperature {after['temperature']:.4f} fitted on validation.csv:")
for key in ("loss", "ece", "accuracy"):
    print(f"  {key:9s} before {before[key]:.4f}  after {after[key]:.4f}")
assert before["accuracy"] == after["accuracy"] and before["confusion_matrix"] == after["confusion_matrix"]
PY
