#!/usr/bin/env bash
# The README's offline quick start on the runtime dependencies alone, as a new user meets it after
# `pip install .`: every command must exit 0 and print no traceback. `.ci/run` runs this before it
# installs the test extra, so a runtime import that only the test extra provides fails CI.
# Usage: scripts/bare_install_check.sh   (lora-cli installed in the active environment; ../shared/data beside the repo)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
[ -d "$repo/../shared/data" ] || { echo "bare_install_check: needs ../shared/data beside the repo" >&2; exit 1; }

# The block after the <!-- quickstart-offline --> marker, with the training cut to 1 epoch of a few steps.
quickstart="$(sed -n '/<!-- quickstart-offline -->/,/^```$/p' "$repo/README.md" | grep -v -e '^<!--' -e '^```')"
[ -n "$quickstart" ] || { echo "bare_install_check: README.md has no <!-- quickstart-offline --> block" >&2; exit 1; }
quickstart="$(printf '%s\n' "$quickstart" | sed -E 's/--epochs [0-9]+/--epochs 1 --max-steps 8/')"
grep -q -- '--max-steps' <<<"$quickstart" || { echo "bare_install_check: no train command in the quick start" >&2; exit 1; }

# A scratch directory beside the repo, so that the README's ../shared/data paths resolve.
work="$(mktemp -d "$repo/../bare-install-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$work"

failed=0
step() {  # run one command line; echo its output; fail on a non-zero exit or a traceback
  local want="$1" line="$2" code=0
  echo "+ $line"
  eval "$line" >"$work/.out" 2>&1 || code=$?
  cat "$work/.out"
  if [ "$code" -ne "$want" ]; then echo "FAILED: exit $code, expected $want" >&2; failed=1; fi
  if grep -q "Traceback" "$work/.out"; then echo "FAILED: a traceback" >&2; failed=1; fi
  return 0
}

step 0 "lora-cli --help >/dev/null && lora-cli --version"
while IFS= read -r line; do
  [ -n "$line" ] && step 0 "$line"
done <<<"$quickstart"
step 0 "lora-cli info spam-adapter.safetensors"
step 0 "lora-cli merge --adapter runs/tiny --out merged.safetensors"
# The other families: a tiny random Qwen3 and Llama 3 with a tokenizer.json built here (`tokenizers` is a runtime dependency).
step 0 "python $repo/scripts/make_tokenizer.py ../shared/data/sms_spam/SMSSpamCollection tokenizer.json"
for preset in qwen3-tiny llama3-tiny; do
  step 0 "lora-cli init --preset $preset --out $preset.safetensors && lora-cli info $preset.safetensors"
  step 0 "lora-cli train --rank 4 --alpha 8 --model $preset.safetensors --tokenizer tokenizer.json --data data/sms --epochs 1 --max-steps 4 --out runs/$preset"
  step 0 "lora-cli eval --adapter runs/$preset --data data/sms/test.csv"
done
# Instruction fine-tuning: the book's split, a few steps, generation and evaluation (the judge speaks urllib).
step 0 "lora-cli data instruction --source ../shared/data/instruction/instruction-data.json --out data/instruct"
step 0 "lora-cli train --task instruct --model gpt2-tiny.safetensors --data data/instruct --epochs 1 --max-steps 4 --out runs/instruct --quiet"
step 0 "lora-cli generate --adapter runs/instruct 'Name a primary color.' --max-new-tokens 5"
step 0 "lora-cli eval --adapter runs/instruct --data data/instruct --limit 4 --max-new-tokens 5"
# An optional package that is not installed: one error line naming the extra, exit 1.
step 1 "lora-cli plot runs/tiny --out curves.png"
if ! grep -q "^error: .*lora-cli\[plot\]" "$work/.out"; then echo "FAILED: no error line naming the plot extra" >&2; failed=1; fi

if [ "$failed" -ne 0 ]; then
  echo "bare install check: FAILED" >&2
  exit 1
fi
echo "bare install check: the offline quick start runs on the runtime dependencies alone"
